"""Checks that stop a run which would train nothing, or lose what it trained, naming the cause before the work is done.

A run that took no optimiser step, or whose loss went to nan, would still evaluate and
report a score; its trial would count on the Pareto plane. These checks make it an error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from qstudy.core.errors import ConfigError, QstudyError
from qstudy.config import DataConfig, TrainConfig
from qstudy.train.engine import world_size


class TrainingDiverged(QstudyError):
    """The training loss became nan or inf: the weights are garbage and no score may be reported."""


def prepare_output_dir(output_dir: Path) -> None:
    """Create the run's output directory now, so that a path that cannot hold the weights fails before training."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output_dir: cannot create {output_dir} ({error.strerror})") from None
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"output_dir: {output_dir} is not writable")


def check_steps(steps: int, examples: int, data: DataConfig, train: TrainConfig) -> None:
    """An epoch of ``examples`` must take an optimiser step: only whole steps are taken, so a batch can outgrow the data."""
    if steps < 1:
        unit = "training clips" if data.batching == "clips" else "training pairs (clip, caption)"
        raise ConfigError(f"train.batch_size {train.batch_size} (x gradient_accumulation_steps "
                          f"{train.gradient_accumulation_steps} x {world_size()} ranks) is more than the {examples} "
                          f"{unit}: an epoch would take no step")


def check_loss(loss: float, epoch: int, train: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"train.learning_rate {train.learning_rate}: the training loss is {loss} in epoch "
                               f"{epoch}, so the weights are unusable and no score is reported")
