"""One run end to end: YAML -> decoded mp4 clips -> training -> pycocoevalcap scores -> metrics.json."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from qstudy.cli import DEMO_CONFIG, main
from qstudy.config import RunConfig
from qstudy.data.annotations import read_clips


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
        # Step time and throughput come from these (bench/gpu_check.sh): training only, without eval.
        assert epoch["train_steps"] == 6 and 0 < epoch["train_seconds"] < epoch["seconds"]
        assert epoch["peak_memory_mb"] is None  # CPU: torch counts no peak
    assert 0 < metrics["trainable_params"] < 0.2 * metrics["total_params"]
    corrupt = [path.stem for path in (data / "videos").iterdir() if path.read_bytes() == b"not an mp4 at all"]
    assert metrics["num_skipped_videos"] == 1 and [v["video_id"] for v in metrics["skipped_videos"]] == corrupt
    assert metrics["wall_seconds"] > 0
    assert (tmp_path / "run" / "adapter.safetensors").stat().st_size > 0
    assert "1 videos skipped" in capsys.readouterr().out


@pytest.mark.parametrize("index", [[4, 0, 4], slice(1, 4), slice(3, 99), 2], ids=["list", "slice", "past-end", "int"])
def test_split_frames_copy_batches_out_of_the_map_and_blind_ones_are_zeros(tmp_path, index):
    import numpy as np
    import torch

    from qstudy.train.recipe import MappedRows

    stored = np.random.default_rng(0).integers(1, 256, (5, 2, 4, 4, 3), dtype=np.uint8)
    stored.tofile(tmp_path / "frames.u8")
    mapped = np.memmap(tmp_path / "frames.u8", np.uint8, "r", shape=stored.shape)

    batch = MappedRows(mapped)[index]
    assert isinstance(batch, torch.Tensor) and np.array_equal(batch.numpy(), stored[index])
    batch.zero_()  # its own memory: the read-only map is untouched
    assert np.array_equal(mapped, stored)
    blind = MappedRows(mapped, blind=True)[index]
    assert blind.shape == batch.shape and not blind.any()


def test_mapped_prefix_states_read_back_as_the_16_bit_floats_they_were(tmp_path):
    from qstudy.train.recipe import MappedRows

    for dtype in (torch.float16, torch.bfloat16):
        states = torch.randn(3, 2, 5, 4).to(dtype)
        states.view(torch.int16).numpy().tofile(tmp_path / "states.bin")
        mapped = np.memmap(tmp_path / "states.bin", np.int16, "r", shape=tuple(states.shape))
        assert torch.equal(MappedRows(mapped, view=dtype)[[2, 0]], states[[2, 0]])


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


# Clips of 3 captions each; an example is a clip with its (sampled) captions, or one (clip, caption) pair.
@pytest.mark.parametrize(("clips", "batching", "per_clip", "world", "batch", "accumulation", "max_steps", "steps"), [
    (105, "pairs", None, 2, 79, 1, None, 1),  # the reproducer: 315 pairs, per-rank shares of 158 and 157 gave 2 and 1 steps
    (105, "pairs", None, 1, 79, 1, None, 3),
    (105, "clips", None, 2, 26, 1, None, 2),  # 105 clips: 52 and 53 per rank would give 2 and 3 steps
    (105, "pairs", 1, 1, 10, 1, None, 10),  # one caption drawn per clip and epoch: 105 pairs
    (34, "pairs", None, 3, 7, 1, None, 4),
    (34, "clips", 2, 3, 2, 2, None, 2),  # whole optimiser steps: 4 micro-batches of 2 clips per rank
    (34, "clips", None, 3, 2, 1, 3, 3),
    (34, "pairs", None, 3, 7, 2, 1, 1),
    (4, "clips", None, 4, 1, 1, None, 1),
    (3, "clips", None, 4, 1, 1, None, 0),  # fewer clips than one step of every rank: nobody steps
    (7, "pairs", None, 2, 11, 1, None, 0),
])
def test_every_rank_takes_the_steps_the_schedule_counts(clips, batching, per_clip, world, batch, accumulation,
                                                       max_steps, steps):
    from qstudy.config import DataConfig, TrainConfig
    from qstudy.data.annotations import Clip
    from qstudy.train.recipe import SplitData, caption_batches, steps_per_epoch

    split = SplitData([Clip(f"clip{i}", Path(f"clip{i}.mp4"), tuple(f"{i} says {j}" for j in range(3)))
                       for i in range(clips)], torch.arange(clips).view(clips, 1, 1, 1, 1), [])
    data = DataConfig(annotations="a.json", video_dir="videos", batching=batching, captions_per_clip=per_clip)
    train = TrainConfig(batch_size=batch, gradient_accumulation_steps=accumulation, max_steps_per_epoch=max_steps)
    assert steps_per_epoch(split, data, train, world) == steps

    seen = []
    for rank in range(world):
        batches = list(caption_batches(split, data, batch, random.Random(0), steps * accumulation, shard=(rank, world)))
        assert len(batches) == steps * accumulation
        if accumulation == 1 and max_steps is None:  # train/pretrain.py's call: as many as every rank can take
            assert len(list(caption_batches(split, data, batch, random.Random(0), shard=(rank, world)))) == steps
        for visual, captions, clip_of_row in batches:
            rows = [int(i) for i in visual.flatten()] if clip_of_row is None else [
                int(visual.flatten()[i]) for i in clip_of_row]
            assert len(rows) == len(captions) and all(caption.startswith(f"{row} says") for row, caption in
                                                      zip(rows, captions))  # every caption row reads its own clip
            if batching == "clips":  # the encoder's input holds each clip once, with all its drawn captions
                assert len(visual) == batch == len(set(visual.flatten().tolist()))
                assert Counter(rows) == Counter({clip: per_clip or 3 for clip in rows})
            else:
                assert len(visual) == batch
            seen += list(zip(rows, captions))
    assert len(seen) == len(set(seen))  # no pair twice in an epoch
    if max_steps is None and steps * accumulation * batch * world == clips * (3 if batching == "pairs" else 1):
        assert len(seen) == clips * 3  # an epoch that divides evenly trains on every pair once


def test_captions_drawn_per_clip_change_from_epoch_to_epoch():
    from qstudy.config import DataConfig
    from qstudy.data.annotations import Clip
    from qstudy.train.recipe import SplitData, caption_batches

    split = SplitData([Clip("clip", Path("clip.mp4"), tuple(f"caption {j}" for j in range(20)))],
                      torch.zeros(1, 1, 1, 1, 1), [])
    data = DataConfig(annotations="a.json", video_dir="videos", captions_per_clip=4)
    drawn = [frozenset(next(caption_batches(split, data, 1, random.Random(epoch), shard=(0, 1)))[1]) for epoch in range(5)]
    assert all(len(captions) == 4 for captions in drawn) and len(set(drawn)) > 1


def test_two_zero3_ranks_build_partitioned_and_finish_an_epoch_whose_clips_do_not_split_evenly(tiny_workspace,
                                                                                                 tmp_path):
    """torchrun, 2 ranks over gloo, ZeRO-3: each rank builds and holds half the model; 63 clips in batches of 31.

    Uneven shares would give the ranks 2 and 1 steps, and a rank that steps once more than
    the other waits forever in a collective; the timeout turns that hang into a failure.
    What a rank holds is measured when the engine takes the model, before it could partition
    anything (``held_parameters.py``).
    """
    from qstudy.data.synthetic import SyntheticSpec, generate
    from qstudy.methods.inject import apply_adapter, count_parameters
    from qstudy.model.captioner import Captioner

    annotations = generate(tmp_path / "data", SyntheticSpec(domain="target", num_clips=90, seed=1), progress=False)
    config = short_run(tiny_workspace, tmp_path, epochs=1, batch_size=31, deepspeed=True, zero_stage=3,
                       max_steps_per_epoch=None)
    config["data"].update({"annotations": str(annotations), "video_dir": str(tmp_path / "data" / "videos"),
                           "max_val_clips": 4})
    config["eval"]["max_new_tokens"] = 4
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert len(read_clips("msrvtt", annotations, tmp_path / "data" / "videos", "train")) == 63

    ranks = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(Path(__file__).with_name("held_parameters.py")), str(path), str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = ranks.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun then stops its ranks, which run in sessions of their own (a kill would orphan them).
        ranks.terminate()
        pytest.fail(f"2 ranks still running after 180 s: {ranks.communicate(timeout=60)[1][-3000:]}")
    assert ranks.returncode == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(epoch["epoch"], epoch["train_steps"]) for epoch in metrics["epochs"]] == [(0, 1)]

    # The LM's parameters are split in two (each rank's share rounded up); the captioner's too, but
    # for the projector and adapter, built whole and partitioned by the engine.
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert held["lm"]["held"] < 0.51 * held["lm"]["whole"], (rank, held)
        assert held["captioner"]["held"] < 0.6 * held["captioner"]["whole"], (rank, held)
    # Counted whole, though no rank holds the whole.
    plain = Captioner.from_pretrained(RunConfig.from_dict(config).model, config["data"]["num_frames"])
    apply_adapter(plain, RunConfig.from_dict(config).adapter)
    assert (metrics["trainable_params"], metrics["total_params"]) == count_parameters(plain)
