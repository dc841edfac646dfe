"""`qstudy rehearse`: one short trial per arm at the space's real shapes, and what the full study would cost.

The units (heaviest config, CPU settings, the full study's epoch, random towers from a
config.json) run without Ray. The rehearsal itself runs once on the session's Ray cluster and
MLflow server, as a space asking for a GPU the cluster lacks: the CPU settings, DeepSpeed, the
table, the estimate, and nothing left behind as a study. One worker trains in the trial's own
actor: a TorchTrainer's start-up (bench/study_overhead.py) would add seconds and no check;
bench/rehearse_cpu.sh runs the rehearsal on two Ray Train workers.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from servers import BIN, REPO, mlflow_runs, tiny_space
from shapes import paper_dims, tiny_dims

from qstudy.core.errors import ConfigError
from qstudy.study.rehearsal import REHEARSAL_KEYS, cpu_settings, full_epoch, heaviest, largest, random_tower, \
    tower_config
from qstudy.study.space import Param, SpaceFile, load_space
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("param, expected", [
    (Param("adapter.rank", choices=(16, 64, 32)), 64),
    (Param("train.batch_size", choices=(4,)), 4),
    (Param("adapter.gating", choices=("none", "tanh")), "none"),  # no order: the first
    (Param("adapter.queries_to_lm", choices=(False, True)), False),  # booleans are no sizes
    (Param("adapter.insertion_layers", choices=("last:1", [5, 11])), "last:1"),
    (Param("train.learning_rate", low=1e-4, high=2e-3, log=True), 2e-3),
])
def test_largest_value_of_a_searched_key(param, expected):
    assert largest(param) == expected


def every_count(space, arm) -> list[int]:
    """The trainable count of every valid combination of the arm's adapter keys."""
    searched = [param for param in arm.params if param.key.startswith("adapter.")]
    counts = []
    for combination in itertools.product(*(param.every_value() for param in searched)):
        try:
            adapter = space.run_config(arm.method, dict(zip((p.key for p in searched), combination))).adapter
            adapter.validate(space.dims)
        except ConfigError:
            continue
        counts.append(adapter.count_trainable(space.dims))
    return counts


@pytest.mark.parametrize("space_file, dims, budget", [
    ("qadapter.yaml", paper_dims, None),  # its 2% budget
    ("qadapter.yaml", paper_dims, 2_000_000),  # between the arms' smallest and largest configs
    ("all_methods_tiny.yaml", tiny_dims, None),  # no budget
])
def test_each_arm_rehearses_its_largest_config_within_the_budget(space_file, dims, budget):
    space = load_space(REPO / "search_spaces" / space_file, dims=dims())
    space.parameter_budget = budget or space.parameter_budget
    budget = space.parameter_budget or float("inf")
    for arm in space.arms:
        values, count = heaviest(space, arm)
        counts = every_count(space, arm)
        assert count == max(c for c in counts if c <= budget), arm.method
        assert space.run_config(arm.method, values).adapter.count_trainable(space.dims) == count
        assert not set(values) & set(REHEARSAL_KEYS)
        if budget == 2_000_000 and arm.method != "frozen":  # the cap binds
            assert min(counts) < budget < max(counts)


def test_an_arm_wholly_over_the_budget_has_no_config():
    space = load_space(REPO / "search_spaces" / "qadapter.yaml", dims=paper_dims())
    space.parameter_budget = 1
    assert heaviest(space, space.arm("qadapter")) is None


@pytest.mark.parametrize("workers, cpus_per_worker, cpus, expected", [
    (2, 4, 2.0, (2, 0.99)),  # the paper space on this machine: both workers and the trainer's driver fit
    (1, 4, 2.0, (1, 2.0)),
    (4, 1, 2.0, (2, 0.99)),
    (2, 4, 16.0, (2, 4)),
    (3, 4, 1.0, (1, 1.0)),
])
def test_cpu_settings_fit_the_cluster(workers, cpus_per_worker, cpus, expected):
    settings = SpaceFile(study="s", base={}, arms={"frozen": {}}, workers_per_trial=workers,
                         cpus_per_worker=cpus_per_worker, use_gpu=True)
    changed = cpu_settings(settings, cpus)
    assert (changed["workers_per_trial"], changed["cpus_per_worker"]) == expected and changed["use_gpu"] is False
    driver = 0 if changed["workers_per_trial"] == 1 else 0.01
    assert changed["workers_per_trial"] * changed["cpus_per_worker"] + driver <= cpus


def test_the_full_epoch_counts_as_the_recipe_does(tiny_workspace):
    space = load_space(REPO / "search_spaces" / "qadapter_tiny.yaml")
    config = space.run_config("qadapter", {})
    clips, steps, val = full_epoch(config, workers=1)
    assert (clips, steps, val) == (336, 336 // config.train.batch_size, 72)  # the tiny workspace's splits
    assert full_epoch(config, workers=2, train_clips=6513, val_clips=497) == (6513, 6513 // (2 * 6), 497)
    config.data.batching = "pairs"  # five captions per clip, each its own example
    assert full_epoch(config, workers=2, train_clips=6513)[1] == 5 * 6513 // (2 * 6)


def test_random_towers_come_from_a_config_json_alone(tmp_path):
    from transformers import CLIPVisionConfig, GPT2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    vision.save_pretrained(tmp_path / "org" / "vision")
    config = tower_config("org/vision", tmp_path, "base.model.vision_encoder")
    assert config["hidden_size"] == 32 and "architectures" not in config
    tower = random_tower(config, "base.model.vision_encoder", causal_lm=False)
    assert type(tower).__name__ == "CLIPVisionModel" and tower.config.num_hidden_layers == 2
    lm = random_tower({**GPT2Config(n_embd=32, n_layer=1, n_head=2).to_dict(), "architectures": ["GPT2LMHeadModel"]},
                      "base.model.language_model", causal_lm=True)
    assert type(lm).__name__ == "GPT2LMHeadModel" and lm.config.n_embd == 32
    with pytest.raises(ConfigError, match="base.model.language_model: transformers knows no model_type 'no-such'"):
        random_tower({"model_type": "no-such"}, "base.model.language_model", causal_lm=True)
    with pytest.raises(ConfigError, match="base.model.vision_encoder: .* --model-configs DIR"):
        tower_config(str(tmp_path / "nowhere"), tmp_path, "base.model.vision_encoder")


def test_a_hub_model_offline_without_its_config_is_bad_input_before_ray_starts(tmp_path):
    home, ray_dir = tmp_path / "home", tmp_path / "ray"
    home.mkdir()
    done = subprocess.run([str(BIN / "qstudy"), "rehearse", str(REPO / "search_spaces" / "qadapter.yaml")],
                          capture_output=True, text=True, timeout=120,
                          env={**{key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
                               "QSTUDY_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                               "RAY_TMPDIR": str(ray_dir)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "qstudy: config error: base.model.vision_encoder: openai/clip-vit-base-patch16: not a local directory, no "
        "config.json in the Hugging Face cache, and the hub is out of reach (HF_HUB_OFFLINE is set); offline, give "
        "--model-configs DIR with DIR/openai/clip-vit-base-patch16/config.json"]
    assert not ray_dir.exists() and not list(home.glob("rehearsal-*"))


def test_rehearsal_on_a_cluster_without_gpus(ray_head, mlflow_server, study_home, test_env, tmp_path):
    """A space asking for a GPU worker with DeepSpeed, rehearsed on the session's CPU cluster (2 CPUs)."""
    space = tiny_space(tmp_path, overrides={"train.deepspeed": True, "train.zero_stage": 2,
                                            "train.max_steps_per_epoch": None},
                       use_gpu=True, workers_per_trial=1, cpus_per_worker=4)
    done = subprocess.run([str(BIN / "qstudy"), "rehearse", str(space), "--steps", "2", "--train-clips", "1000",
                           "--address", ray_head.address, "--mlflow-uri", mlflow_server.uri],
                          env={**ray_head.env, "QSTUDY_HOME": str(study_home)}, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "on CPU: use_gpu True -> False, cpus_per_worker 4.0 -> 2.0" in out
    header = next(line for line in out.splitlines() if line.startswith("| arm |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "arm", "config", "status", "trainable", "step s", "eval s/clip", "peak memory MiB", "checkpoint MB",
        "steps/epoch", "device-h/trial"]
    row = next(line for line in out.splitlines() if line.startswith("| qadapter |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2] == "FINISHED" and "-" not in cells[3:]
    assert "full study: 8 trials x 2 epochs on 1 worker(s) each, 1,000 train clips and 16 val clips" in out

    # Nothing left as a study: no study directory, no scratch home, and the family's experiment untouched.
    assert sorted(path.name for path in study_home.iterdir()) == ["base", "cache", "data"]
    parents, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny" + schema.REHEARSAL_EXPERIMENT_SUFFIX)
    (parent,) = [run for run in parents if run.data.tags.get(schema.REHEARSAL_TAG) == str(space.resolve())]
    assert [run.data.tags[schema.PARENT_RUN_TAG] for run in children].count(parent.info.run_id) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    family = client.get_experiment_by_name("qadapter-tiny")
    assert family is None or not client.search_runs([family.experiment_id],
                                                    f"tags.`{schema.STUDY_TAG}` LIKE 'rehearsal-%'")
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, schema.REHEARSAL_ARTIFACT,
                                                       str(tmp_path))).read_text())
    (arm,) = table["arms"]
    loaded = load_space(space, dims=tiny_dims())
    assert (arm["values"], arm["trainable_params"]) == tuple(heaviest(loaded, loaded.arm("qadapter")))
    assert arm["step_seconds"] > 0 and arm["eval_seconds_per_clip"] > 0 and arm["peak_memory_mb"] > 100
    assert arm["checkpoint_bytes"] > 4 * arm["trainable_params"]  # DeepSpeed's: fp32 weights and Adam's moments
    assert arm["steps_per_epoch"] == 1000 // 16
    epochs = 2
    hours = 1 * epochs * (arm["steps_per_epoch"] * arm["step_seconds"] + 16 * arm["eval_seconds_per_clip"]) / 3600
    assert arm["trial_device_hours"] == pytest.approx(hours)
    assert table["device_hours"] == pytest.approx(8 * hours)
    for name in schema.REHEARSAL_ARM_METRICS:
        assert parent.data.metrics[schema.rehearsal_metric("qadapter", name)] == pytest.approx(arm[name])
    assert yaml.safe_load(space.read_text())["study"] == "qadapter-tiny"
