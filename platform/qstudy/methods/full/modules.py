"""Full fine-tuning's modules: none; every base weight trains."""

from __future__ import annotations

from qstudy.methods.full.config import FullFineTuningConfig
from qstudy.model.extension import Extension


def inject(config: FullFineTuningConfig, captioner) -> Extension:
    captioner.requires_grad_(True)
    return Extension()
