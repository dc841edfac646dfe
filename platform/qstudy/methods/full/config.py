"""Full fine-tuning: every weight of both towers and the projector trains (the upper anchor)."""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.methods.base import AdapterConfig
from qstudy.core.dims import ModelDims


@dataclass
class FullFineTuningConfig(AdapterConfig):
    """No hyperparameters: the whole captioner trains."""

    method = "full"

    @property
    def starts_at_base(self) -> bool:
        return True

    def extra_trainable(self, dims: ModelDims) -> int:
        return dims.vision_params + dims.lm_params + dims.temporal_merger_params
