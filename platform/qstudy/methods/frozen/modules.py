"""The frozen baseline's modules: none; only the projector trains."""

from __future__ import annotations

from qstudy.methods.frozen.config import FrozenConfig


def inject(config: FrozenConfig, captioner) -> None:
    """Nothing to add: apply_adapter already froze all but the projector."""
