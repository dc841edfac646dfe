"""Search spaces are validated before Ray starts: bad fields are named, budgets mark configs infeasible.

Torch-free: the model's shapes are given as a hand-built ModelDims of the tiny preset (the
numbers ``qstudy base`` produces), so nothing here needs the tiny workspace; the paper-scale
space is validated against shapes built from transformers config classes on the meta device.
"""

from __future__ import annotations

import copy
import re
import pickle
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from qstudy.core.errors import ConfigError
from qstudy.config import RunConfig
from qstudy.methods.qadapter import config as qadapter_config
from qstudy.study.search import make_sampler
from qstudy.study.space import BUDGET_CONSTRAINT, SampledConfig, SpaceSampler, load_space, parse_space
from qstudy.study.trial import StudyContext, worker_task
from qstudy.study.storage import StudyStorage
from shapes import paper_dims, tiny_dims

REPO = Path(__file__).resolve().parents[2]
SPACES = REPO / "search_spaces"


TINY_SPACE = {
    "study": "unit",
    "base": "tiny_qadapter",
    "overrides": {"train.epochs": 1},
    "arms": {
        "qadapter": {"adapter.rank": {"choices": [4, 16]}, "adapter.insertion_layers": {"choices": ["last:1", [0, 3]]},
                     "train.learning_rate": {"low": 0.0005, "high": 0.005, "log": True}},
        "lora": {"adapter.rank": {"choices": [2, 8]}, "adapter.target": "vision"},
        "full": {},
    },
}


def parse(data: dict):
    return parse_space(data, "unit.yaml", base_dir=REPO, dims=tiny_dims())


def mutated(change) -> dict:
    data = copy.deepcopy(TINY_SPACE)
    change(data)
    return data


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_spaces_validate_offline(path):
    dims = paper_dims() if path.name == "qadapter.yaml" else tiny_dims()
    space = load_space(path, dims=dims)
    assert space.arms and space.settings.trials >= 1
    if space.settings.parameter_budget is not None:
        assert 0 < space.parameter_budget < dims.total_params


def arm_param(method: str, key: str, spec):
    return lambda data: data["arms"][method].update({key: spec})


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(trails=4), "unknown key trails"),
    (arm_param("qadapter", "adapter.rank", {"choise": [4]}), r"unknown key arms\.qadapter\.adapter\.rank\.choise"),
    (arm_param("qadapter", "adapter.rnk", {"choices": [4]}), r"arms\.qadapter\.adapter\.rnk: unknown key adapter\.rnk"),
    (lambda d: d["overrides"].update({"train.learning_rat": 0.1}), r"base: unknown key train\.learning_rat"),
    (lambda d: d["arms"].update(qadaptr={}), r"arms\.qadaptr: unknown method"),
    (arm_param("qadapter", "adapter.rank", {"choices": []}),
     r"arms\.qadapter\.adapter\.rank\.choices: expected a non-empty list"),
    (arm_param("qadapter", "adapter.insertion_layers", {"choices": ["last:1", [1, 4]]}),
     r"arms\.qadapter\.adapter\.insertion_layers: value \[1, 4\].*layer 4 is beyond the encoder's 4 layers"),
    (arm_param("qadapter", "adapter.rank", {"choices": [16, 65]}),
     r"arms\.qadapter\.adapter\.rank: value 65.*must be in 1\.\.64"),
    (arm_param("lora", "adapter.rank", {"low": 2, "high": 128}),
     r"arms\.lora\.adapter\.rank: value 128.*exceeds the smallest targeted width 64"),
    (arm_param("qadapter", "train.learning_rate", {"low": 0.0, "high": 0.01, "log": True}),
     r"arms\.qadapter\.train\.learning_rate\.low: a log range needs low > 0"),
    (lambda d: d.update(concurrency=0), "concurrency: 0 must be >= 1"),
    (lambda d: d.update(parameter_budget="1.5 apples"), "parameter_budget: budget '1.5 apples'"),
    (lambda d: d.update(scheduler="asha"), r"scheduler: .*'asha'"),
    (lambda d: d.update(scheduler="moasha", reduction_factor=1), "reduction_factor: 1 must be >= 2"),
    (lambda d: d.update(scheduler="moasha", grace_epochs=0), "grace_epochs: 0 must be >= 1"),
    (lambda d: d.update(scheduler="moasha", grace_epochs=1), "grace_epochs: 1 x reduction_factor 3 exceeds train.epochs 1"),
    (lambda d: d.update(scheduler="moasha", grace_epoch=1), "unknown key grace_epoch"),
])
def test_bad_spaces_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        parse(mutated(change))


def test_scheduler_settings_parse():
    assert parse(TINY_SPACE).settings.scheduler == "none"
    space = parse(mutated(lambda d: d.update(scheduler="moasha", grace_epochs=2, reduction_factor=2,
                                             overrides={"train.epochs": 9})))
    assert (space.settings.scheduler, space.settings.grace_epochs, space.settings.reduction_factor) == ("moasha", 2, 2)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(mutated(lambda d: d["arms"]["qadapter"].update({"adapter.rank": {"choices": []}}))))
    with pytest.raises(ConfigError, match=r"space\.yaml: arms\.qadapter\.adapter\.rank\.choices"):
        load_space(path, dims=tiny_dims())


def test_budget_marks_configs_infeasible_before_training():
    """Over-budget configs reach Optuna as constraint violations; the sampler never raises on them."""
    dims = tiny_dims()
    unbudgeted = parse(TINY_SPACE)
    frozen_count = unbudgeted.run_config("frozen", {}).adapter.count_trainable(dims)
    space = parse(mutated(lambda d: d.update(parameter_budget=frozen_count + 5000)))
    sampler = SpaceSampler(space)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {}
    for _ in range(12):
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(sampler(trial))
        predicted = space.run_config(sampled.method, sampled.values).adapter.count_trainable(dims)
        assert sampled.trainable_params == predicted
        assert sampled.over_budget == (predicted > space.parameter_budget)
        study.tell(trial, [0.0, predicted])
        seen[sampled.method] = sampled.over_budget
        assert study.trials[-1].constraints == {BUDGET_CONSTRAINT: predicted - space.parameter_budget}
    assert seen["full"] is True and seen["qadapter"] is False  # full FT trains every weight: over any small budget


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "budget"])
def test_every_sampler_a_space_can_name_survives_the_pickling_tune_does(sampler):
    """Tune pickles the searcher into its experiment state when the Tuner is built, and restores it on --resume."""
    from ray import cloudpickle

    from qstudy.study.tuner import make_searcher

    space = parse(mutated(lambda d: d.update(sampler=sampler)))
    restored = cloudpickle.loads(cloudpickle.dumps(make_searcher(space, "pickled", None, None)))
    trial = restored._ot_study.ask()  # the restored sampler still proposes
    assert SampledConfig.from_tune_config(SpaceSampler(space)(trial)).method in {arm.method for arm in space.arms}


def test_rank_and_gating_are_sampled_only_where_the_placement_uses_them():
    """The design space under its own sampler (multivariate TPE): rank is a parameter of side trials alone, gating of gated ones."""
    space = load_space(SPACES / "qadapter_design.yaml", dims=tiny_dims())
    sampler = SpaceSampler(space)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(space))
    placements = set()
    for number in range(40):  # past TPE's start-up trials, so its model proposes too
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(sampler(trial))
        study.tell(trial, [float(number % 7), sampled.trainable_params])
        if sampled.method != "qadapter":
            continue
        placement = sampled.run_config.adapter.placement
        placements.add(placement)
        for key, used in (("adapter.rank", placement == "side"), ("adapter.gating", placement != "sequence")):
            assert (f"qadapter.{key}" in study.trials[-1].params) == used == (key in sampled.values), (placement, key)
    assert placements == {"side", "gated_attention", "sequence"}


def test_a_trial_config_is_built_and_its_layers_resolved_once_from_sampler_to_worker(monkeypatch, tmp_path):
    """The sampler's validated RunConfig is what the worker trains, carried through Ray's pickling, never rebuilt."""
    space = parse(TINY_SPACE)
    builds, resolutions = [], []
    build = RunConfig.from_dict.__func__
    monkeypatch.setattr(RunConfig, "from_dict", classmethod(lambda cls, *a, **k: builds.append(a) or build(cls, *a, **k)))
    resolve = qadapter_config.resolve_layers
    monkeypatch.setattr(qadapter_config, "resolve_layers", lambda *a, **k: resolutions.append(a) or resolve(*a, **k))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"method": "qadapter"})

    tune_config = pickle.loads(pickle.dumps(SpaceSampler(space)(study.ask())))  # Tune hands the trial a copy
    sampled = SampledConfig.from_tune_config(tune_config)
    context = StudyContext(study_dir=str(tmp_path), space=space, tracking=None,
                           storage=StudyStorage(str(tmp_path), "s"))
    task = pickle.loads(pickle.dumps(worker_task(sampled, context, "t1")))  # as Ray ships it to the worker
    adapter = task.run_config.adapter
    adapter.validate(space.dims)  # what the worker's build asks: the shape check, the frozen prefix, the count
    assert (adapter.frozen_vision_layers(space.dims), adapter.count_trainable(space.dims)) == (
        adapter.layers(space.dims)[0], sampled.trainable_params)

    assert (len(builds), len(resolutions)) == (1, 1)
    assert tune_config["method"] == sampled.method == "qadapter"  # the live table's column
    assert task.run_config.output_dir == str(tmp_path / "trials" / "t1")
    assert sampled.run_config.output_dir != task.run_config.output_dir  # the sampler's copy is left as sampled
    expected = space.run_config("qadapter", sampled.values).to_dict()
    assert task.run_config.to_dict() == {**expected, "output_dir": str(tmp_path / "trials" / "t1")}


def test_data_variants_are_the_distinct_data_sections_trials_can_get():
    """What the study driver decodes into the frame cache: every data.* value of every arm, each once."""
    def frames_per_arm(data):
        data["arms"]["qadapter"]["data.num_frames"] = {"choices": [4, 8]}
        data["arms"]["lora"]["data.num_frames"] = {"low": 2, "high": 4}
        data["arms"]["lora"]["data.max_val_clips"] = 10

    variants = parse(mutated(frames_per_arm)).data_variants()
    assert sorted((arm, config.data.num_frames, config.data.max_val_clips) for arm, config in variants) == [
        ("lora", 2, 10), ("lora", 3, 10), ("lora", 4, 10), ("qadapter", 4, None), ("qadapter", 8, None)]
    assert [arm for arm, _ in parse(TINY_SPACE).data_variants()] == ["qadapter"]  # one data section: one variant


def test_space_validation_imports_no_torch():
    code = ("import sys\nsys.path[:0] = [%r, %r]\nfrom test_space import TINY_SPACE, parse\n"
            "space = parse(TINY_SPACE)\nassert 'torch' not in sys.modules, 'torch imported'\nprint('ok')\n"
            % (str(Path(__file__).parent), str(Path(__file__).parents[1])))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_cli_exits_2_naming_the_field_before_ray_starts(tmp_path, capsys):
    from qstudy.cli import main

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(mutated(arm_param("qadapter", "adapter.rank", {"choices": []}))))
    assert main(["study", str(path)]) == 2
    assert "arms.qadapter.adapter.rank.choices: expected a non-empty list" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_every_problem_of_a_space_is_reported_at_once():
    """The arms of the paper-scale space on the tiny base, plus two bad settings: one run names them all."""
    data = mutated(lambda d: d.update(arms=yaml.safe_load((SPACES / "qadapter.yaml").read_text())["arms"],
                                      concurrency=0, reduction_factor=1))
    with pytest.raises(ConfigError) as error:
        parse(data)
    problems = error.value.problems
    expected = [r"^concurrency: 0 must be >= 1$", r"^reduction_factor: 1 must be >= 2",
                r"^arms\.qadapter\.adapter\.insertion_layers: value \[5, 11\]: .*layer 5 is beyond",
                r"^arms\.qadapter\.adapter\.rank: value 128: .*must be in 1\.\.64",
                r"^arms\.qadapter\.adapter\.rank: value 256: .*must be in 1\.\.64"]
    for pattern in expected:
        assert any(re.search(pattern, problem) for problem in problems), (pattern, problems)
    assert str(error.value) == "\n".join(problems)
