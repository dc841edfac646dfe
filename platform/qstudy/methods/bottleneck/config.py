"""Bottleneck adapters (Houlsby; VL-Adapter, Sung et al. CVPR 2022) after attention and FFN, with weight sharing.

Also the placement every residual adapter method shares (:class:`ResidualAdapterConfig`,
used by Compacter and Hyperformer too): an adapter ``x + f(x)`` on the output of the
attention sublayer and of the feed-forward sublayer of every layer of the targeted towers,
before the block's own residual sum, as Houlsby et al. place them; optionally the towers'
LayerNorms train too (``unfreeze_layer_norms``: VL-Adapter found it essential). Followed from
the reference code (ylsung/VL_adapter, VL-T5/src/param.py): reduction factor 16 by default,
GELU, adapters in the language model by default. Sharing, as our reading of VL-Adapter's
"single adapter" and half-shared variants across layers: ``single`` is one adapter used at
every position of a tower, ``half`` one shared down-projection with an up-projection per
position. Up-projections start at zero, so the adapted model starts exactly at the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qstudy.methods.base import AdapterConfig, TowerTarget, targeted_towers
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


@dataclass
class ResidualAdapterConfig(AdapterConfig):
    """Where residual adapters go and what else trains; subclasses say what one tower's adapters are."""

    target: TowerTarget = "lm"
    reduction_factor: int = 16
    unfreeze_layer_norms: bool = True

    @property
    def starts_at_base(self) -> bool:  # every subclass zero-initialises what its adapters add
        return True

    def towers(self, dims: ModelDims) -> list[tuple[str, int, int]]:
        """(tower, hidden width, layers) of each targeted tower."""
        towers = {"vision": (dims.vision_hidden, dims.vision_layers), "lm": (dims.lm_hidden, dims.lm_layers)}
        return [(tower, *towers[tower]) for tower in targeted_towers(self.target)]

    def validate(self, dims: ModelDims) -> None:
        if self.reduction_factor < 1:
            raise ConfigError(f"adapter.reduction_factor: {self.reduction_factor} must be >= 1")
        for tower, hidden, _ in self.towers(dims):
            if hidden // self.reduction_factor < 1:
                raise ConfigError(f"adapter.reduction_factor: {self.reduction_factor} leaves no bottleneck "
                                  f"for the {tower} model's hidden size {hidden}")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return 0 if "vision" in targeted_towers(self.target) else dims.vision_layers

    def tower_params(self, hidden: int, bottleneck: int, layers: int) -> int:
        """Closed-form parameter count of one tower's adapters (two positions per layer)."""
        raise NotImplementedError

    def extra_trainable(self, dims: ModelDims) -> int:
        total = 0
        for tower, hidden, layers in self.towers(dims):
            total += self.tower_params(hidden, hidden // self.reduction_factor, layers)
            if self.unfreeze_layer_norms:
                total += dims.norm_params(tower)
        return total

@dataclass
class BottleneckConfig(ResidualAdapterConfig):
    """Houlsby bottleneck d -> d / reduction_factor -> d, per position or shared across layers."""

    method = "bottleneck"

    sharing: Literal["none", "single", "half"] = "none"

    def tower_params(self, hidden: int, bottleneck: int, layers: int) -> int:
        positions = 2 * layers
        down, up = hidden * bottleneck + bottleneck, bottleneck * hidden + hidden
        return {"none": positions * (down + up), "single": down + up, "half": down + positions * up}[self.sharing]
