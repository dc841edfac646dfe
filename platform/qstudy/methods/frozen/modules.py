"""The frozen baseline's modules: none; only the projector trains."""

from __future__ import annotations

from qstudy.methods.frozen.config import FrozenConfig
from qstudy.model.extension import Extension


def inject(config: FrozenConfig, captioner) -> Extension:
    """Nothing to add: apply_adapter already froze all but the projector."""
    return Extension()
