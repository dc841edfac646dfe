"""Full fine-tuning's modules: none; every base weight trains."""

from __future__ import annotations

from qstudy.methods.full.config import FullFineTuningConfig


def inject(config: FullFineTuningConfig, captioner) -> None:
    captioner.requires_grad_(True)
