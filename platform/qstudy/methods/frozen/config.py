"""Frozen base, projector only: the cheapest arm, and the floor any adapter must beat."""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.methods.base import AdapterConfig
from qstudy.core.dims import ModelDims


@dataclass
class FrozenConfig(AdapterConfig):
    """No hyperparameters: both towers stay frozen, the projector trains."""

    method = "frozen"

    @property
    def starts_at_base(self) -> bool:
        return True

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return dims.vision_layers

    def extra_trainable(self, dims: ModelDims) -> int:
        return 0
