"""A run stopped at an epoch boundary, or killed mid-epoch, then resumed, ends with the uninterrupted run's metrics.

Bit for bit, on one CPU thread: the thread count splits CPU reductions differently, so only
runs with the same count can match to the bit.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recipe import short_run

from qstudy.config import RunConfig
from qstudy.model.captioner import Captioner
from qstudy.train.engine import cpu_threads
from qstudy.train.recipe import run

EPOCHS = 3


class Interrupted(Exception):
    """Stands in for the kill: the run stops where it is, and only its checkpoints survive."""


def curve(result) -> list[tuple]:
    """Everything an epoch reports that training decides: its loss, its scores, its example captions."""
    return [(e.epoch, e.train_steps, e.train_loss, e.val, e.examples) for e in result.epochs]


def disturb_every_generator() -> None:
    """Draw from every global generator, as whatever ran in a killed process before would have."""
    torch.rand(7)
    np.random.rand(7)
    random.random()


def interrupted_run(config: RunConfig, directory: Path, stop_after_epoch: int, mid_epoch: bool) -> dict[int, Path]:
    """Run until stopped: right after ``stop_after_epoch``'s checkpoint, or two training steps into the next epoch.

    Returns the checkpoints it left, by epoch.
    """
    checkpoints: dict[int, Path] = {}
    steps_after = []

    def keep(result, checkpoint: Path) -> None:
        checkpoints[result.epoch] = Path(shutil.copytree(checkpoint, directory / f"checkpoint-{result.epoch}"))
        if result.epoch == stop_after_epoch and not mid_epoch:
            raise Interrupted

    def count_training_steps(module, args, output) -> None:
        if isinstance(module, Captioner) and module.training and stop_after_epoch in checkpoints:
            steps_after.append(1)
            if len(steps_after) == 2:
                raise Interrupted

    hook = torch.nn.modules.module.register_module_forward_hook(count_training_steps)
    try:
        with pytest.raises(Interrupted):
            run(config, on_epoch=keep, progress=False)
    finally:
        hook.remove()
    return checkpoints


@pytest.mark.parametrize("deepspeed", [False, True], ids=["plain", "deepspeed-zero2"])
def test_a_stopped_or_killed_run_resumes_to_the_uninterrupted_runs_metrics(tiny_workspace, tmp_path, deepspeed):
    config = RunConfig.from_dict(short_run(tiny_workspace, tmp_path, epochs=EPOCHS, max_steps_per_epoch=3,
                                           deepspeed=deepspeed, zero_stage=2 if deepspeed else 0))
    with cpu_threads(1):
        uninterrupted = curve(run(config, progress=False))
        assert len(uninterrupted) == EPOCHS
        for stop_after, mid_epoch in [(0, False), (1, True)]:
            checkpoints = interrupted_run(config, tmp_path / f"stopped-{stop_after}-{mid_epoch}", stop_after, mid_epoch)
            assert sorted(checkpoints) == list(range(stop_after + 1))
            disturb_every_generator()
            resumed = curve(run(config, resume_from=checkpoints[stop_after], progress=False))
            assert resumed == uninterrupted[stop_after + 1:], (stop_after, mid_epoch)
