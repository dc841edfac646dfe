"""One run end to end: YAML -> decoded mp4 clips -> training -> pycocoevalcap scores -> metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from qstudy.cli import DEMO_CONFIG, main
from qstudy.config import RunConfig


def short_run(workspace: Path, tmp_path: Path, **train) -> dict:
    """The tiny preset cut to a smoke-sized run, as a plain dict ready to edit or dump."""
    config = RunConfig.from_yaml(DEMO_CONFIG).to_dict()
    config["train"].update({"epochs": 2, "max_steps_per_epoch": 6, **train})
    config["data"]["max_val_clips"] = 12
    config["eval"]["meteor"] = False
    config["output_dir"] = str(tmp_path / "run")
    return config


def test_qstudy_train_writes_every_metric_and_counts_the_corrupt_video(tiny_workspace, corrupt_target_data, tmp_path,
                                                                      capsys):
    config = short_run(tiny_workspace, tmp_path)
    data = corrupt_target_data
    config["data"].update({"annotations": str(data / "annotations.json"), "video_dir": str(data / "videos")})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["train", str(path)]) == 0

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [0, 1]
    for epoch in metrics["epochs"]:
        assert set(epoch["val"]) == {"bleu4", "rouge_l", "cider"}  # METEOR off in this config
        assert epoch["train_loss"] > 0
    assert 0 < metrics["trainable_params"] < 0.2 * metrics["total_params"]
    assert metrics["num_skipped_videos"] == 1 and "not" not in metrics["skipped_videos"][0]["video_id"]
    assert metrics["wall_seconds"] > 0
    assert (tmp_path / "run" / "adapter.safetensors").stat().st_size > 0
    assert "1 videos skipped" in capsys.readouterr().out


@pytest.mark.parametrize("index", [[4, 0, 4], slice(1, 4), slice(3, 99), 2], ids=["list", "slice", "past-end", "int"])
def test_split_frames_copy_batches_out_of_the_map_and_blind_ones_are_zeros(tmp_path, index):
    import numpy as np
    import torch

    from qstudy.train.recipe import SplitFrames

    stored = np.random.default_rng(0).integers(1, 256, (5, 2, 4, 4, 3), dtype=np.uint8)
    stored.tofile(tmp_path / "frames.u8")
    mapped = np.memmap(tmp_path / "frames.u8", np.uint8, "r", shape=stored.shape)

    batch = SplitFrames(mapped)[index]
    assert isinstance(batch, torch.Tensor) and np.array_equal(batch.numpy(), stored[index])
    batch.zero_()  # its own memory: the read-only map is untouched
    assert np.array_equal(mapped, stored)
    blind = SplitFrames(mapped, blind=True)[index]
    assert blind.shape == batch.shape and not blind.any()


def test_unknown_key_fails_before_any_model_is_built(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["adapter"]["num_querry_tokens"] = 4
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    assert "adapter.num_querry_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("zero_stage", [2])
def test_deepspeed_engine_trains_and_resumes_on_cpu(tiny_workspace, tmp_path, zero_stage):
    """The DeepSpeed path of the same recipe: ZeRO over gloo on one CPU rank, checkpoint, resume."""
    from qstudy.train.recipe import run

    checkpoints = []

    def keep_checkpoint(result, directory: Path) -> None:
        kept = tmp_path / f"checkpoint-{result.epoch}"
        shutil.copytree(directory, kept)
        checkpoints.append(kept)

    config = RunConfig.from_dict(short_run(tiny_workspace, tmp_path, deepspeed=True, zero_stage=zero_stage))
    first = run(config, on_epoch=keep_checkpoint, progress=False)
    assert len(first.epochs) == 2 and all(e.train_loss > 0 for e in first.epochs)
    assert any(checkpoints[0].rglob("*")), "DeepSpeed wrote no checkpoint"

    resumed = run(config, resume_from=checkpoints[0], progress=False)
    assert [e.epoch for e in resumed.epochs] == [1]  # epoch 0 came from the checkpoint
