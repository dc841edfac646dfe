"""A real tiny trial, logged to MLflow as the study engine logs it, exported, reloaded: identical captions and logits.

The trial trains with ``qstudy.train.recipe.run`` on the tiny workspace for a few steps. Its
own in-memory model is the reference: the captions it produced at its last evaluation (the
run's ``examples``) and the weights of the checkpoint it reported after that epoch, which
the engine's resume path loads. The export goes through MLflow, ``qstudy export`` and
``qstudy caption``.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qstudy.cli import main
from qstudy.config import RunConfig
from qstudy.tracking import schema
from qstudy.tracking.writer import TrialTracker
from qstudy.study.space import PRESETS_DIR, parse_space

QUICK = {
    "train.epochs": 1,
    "train.max_steps_per_epoch": 4,
    "train.batch_size": 8,
    "data.max_val_clips": 6,
    "eval.meteor": False,
    "eval.batch_size": 6,
}


@pytest.fixture(scope="module")
def trained_trial(tiny_workspace, tmp_path_factory, study_logging):
    """A finished Q-Adapter trial and a failed one in a fresh MLflow store; what the trial's own model produced."""
    import torch

    from qstudy.train.recipe import run

    root = tmp_path_factory.mktemp("export")
    raw = yaml.safe_load((PRESETS_DIR / "tiny_qadapter.yaml").read_text())
    for key, value in QUICK.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    config = RunConfig.from_dict(raw, base_dir=PRESETS_DIR)  # expands ${QSTUDY_HOME}
    config.output_dir = str(root / "trial")
    seen = {}

    def on_epoch(result, checkpoint: Path) -> None:
        seen["examples"] = result.examples
        shutil.copyfile(checkpoint / "trainable.safetensors", root / "trial-checkpoint.safetensors")

    torch.manual_seed(0)
    result = run(config, on_epoch=on_epoch, progress=False)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    target = study_logging.start_study(uri, "export-family", "export-study", root)
    hyper = {"adapter.num_query_tokens": 8, "adapter.rank": 16}
    # As the trial driver and the worker log it (qstudy.study.trial / worker).
    tracker = TrialTracker(target, "trial_0", "qadapter-trial_0")
    tracker.set_tags({schema.METHOD_TAG: "qadapter"})
    tracker.log_params(schema.trial_params("qadapter", hyper, over_budget=False, workers=1, deepspeed=False,
                                           zero_stage=0))
    config_file = root / schema.CONFIG_ARTIFACT
    config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tracker.log_artifact(config_file)
    for epoch in result.epochs:
        tracker.log_epoch({schema.EPOCH: epoch.epoch,
                           **{f"{schema.VAL_PREFIX}{name}": value for name, value in epoch.val.items()}})
    tracker.log_metrics(
        {
            schema.CIDER: result.final["cider"],
            schema.TRAINABLE_PARAMS: result.trainable_params,
            schema.TOTAL_PARAMS: result.total_params,
        },
        step=result.epochs[-1].epoch,
    )
    tracker.log_artifact(Path(config.output_dir) / schema.WEIGHTS_ARTIFACT)
    tracker.log_artifact(Path(config.output_dir) / schema.METRICS_ARTIFACT)
    tracker.finish(schema.FINISHED)
    # A failed trial has no weights: it must never be selected.
    failed = study_logging.Trial("trial_1", "qadapter", hyper, None, 10, status=schema.FAILED)
    study_logging.end_trial(study_logging.begin_trial(target, failed), failed)
    return {
        "uri": uri,
        "config": config,
        "result": result,
        "examples": seen["examples"],
        "checkpoint": root / "trial-checkpoint.safetensors",
        "root": root,
    }


def _val_batch(config: RunConfig, image_size: int):
    from qstudy.train.recipe import load_split

    split = load_split(config.data, config.data.val_split, image_size, config.data.max_val_clips, progress=False)
    return split, split.frames[:3]


def _logits(captioner, frames, captions):
    import torch

    ids, mask = captioner.tokenize(captions)
    with torch.no_grad():
        inputs, full_mask = captioner._lm_inputs(captioner.encode_frames(frames), ids, mask)
        return captioner.lm(inputs_embeds=inputs, attention_mask=full_mask).logits


def test_export_front_then_reload_gives_the_trials_outputs_exactly(trained_trial, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from qstudy.methods.inject import apply_adapter
    from qstudy.export import load_adapter
    from qstudy.model.captioner import Captioner

    out = tmp_path / "exported"
    assert (
        main(["export", "export-study", "--mlflow-uri", trained_trial["uri"], "--select", "front", "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    index = yaml.safe_load((out / "index.yaml").read_text())
    assert index["selection"] == "front" and index["studies"] == ["export-study"]
    (entry,) = index["trials"]  # the single finished trial; the failed one has nothing to export
    result = trained_trial["result"]
    assert entry["trial_id"] == "trial_0" and entry["trainable_params"] == result.trainable_params
    assert entry["why"].startswith("on the Pareto front (1 of 1") and entry["why"].endswith("its knee")
    exported = out / entry["directory"]
    assert sorted(path.name for path in exported.iterdir()) == ["adapter.safetensors", "config.yaml", "metrics.json"]
    metrics = json.loads((exported / "metrics.json").read_text())
    assert metrics["cider"] == pytest.approx(result.final["cider"])
    assert metrics["epoch_val_cider"] == pytest.approx([result.final["cider"]])

    # Adapter parameters only: exactly what trained, nothing of the frozen base.
    weights = load_file(exported / "adapter.safetensors")
    assert sum(tensor.numel() for tensor in weights.values()) == result.trainable_params < result.total_params

    captioner, config = load_adapter(exported)
    assert config.output_dir == f"runs/{exported.name}"  # seeds `qstudy train` without touching the trial's dir

    # The trial's own model, rebuilt from the checkpoint it reported (the engine's resume path).
    trial_config = trained_trial["config"]
    trial_model = Captioner.from_pretrained(trial_config.model, trial_config.data.num_frames)
    apply_adapter(trial_model, trial_config.adapter)
    trial_model.load_state_dict(load_file(trained_trial["checkpoint"]), strict=False)
    trial_model.eval()
    untrained = Captioner.from_pretrained(trial_config.model, trial_config.data.num_frames)
    apply_adapter(untrained, trial_config.adapter)
    untrained.eval()

    split, frames = _val_batch(config, captioner.image_size)
    captions = [clip.captions[0] for clip in split.clips[:3]]
    exported_logits = _logits(captioner, frames, captions)
    assert torch.equal(exported_logits, _logits(trial_model, frames, captions))
    assert not torch.allclose(exported_logits, _logits(untrained, frames, captions))  # the weights matter

    generated = captioner.generate(frames, config.eval.max_new_tokens, config.eval.num_beams)
    examples = trained_trial["examples"]  # what the trial's in-memory model said at its last evaluation
    assert generated == [examples[clip.video_id] for clip in split.clips[:3]]

    # `qstudy caption` prints the same captions, and names a video it cannot decode.
    videos = [str(clip.path) for clip in split.clips[:3]]
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", "--adapter", str(exported), *videos, str(tmp_path / "missing.mp4")])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{video}\t{caption}" for video, caption in zip(videos, generated)] + [
        f"{tmp_path / 'missing.mp4'}\t(could not decode this video)"
    ]


def test_exported_config_seeds_a_new_study_and_other_selections(trained_trial, tmp_path, capsys):
    uri = trained_trial["uri"]
    for select in ("knee", "best", "budget=100%"):
        out = tmp_path / select.replace("=", "-").replace("%", "pct")
        assert main(["export", "export-study", "--mlflow-uri", uri, "--select", select, "--out", str(out)]) == 0
        (entry,) = yaml.safe_load((out / "index.yaml").read_text())["trials"]
        assert entry["trial_id"] == "trial_0"
    capsys.readouterr()

    seeded = parse_space(
        {
            "study": "seeded",
            "base": str(out / entry["directory"] / "config.yaml"),
            "arms": {"qadapter": {"adapter.rank": {"choices": [4, 8]}}},
        },
        base_dir=tmp_path,
    )
    assert seeded.base["model"] == trained_trial["config"].to_dict()["model"]

    assert main(["export", "export-study", "--mlflow-uri", uri, "--select", "budget=10", "--out",
                 str(tmp_path / "none")]) == 2
    assert "no finished trial qualifies" in capsys.readouterr().err
    assert main(["export", "export-study", "--mlflow-uri", uri, "--select", "top3", "--out", str(tmp_path / "x")]) == 2
    assert "--select 'top3': expected one of front, knee, best" in capsys.readouterr().err
