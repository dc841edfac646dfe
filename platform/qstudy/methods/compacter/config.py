"""Compacter (Karimi Mahabadi et al. 2021; as an arm of VL-Adapter): bottleneck adapters built from LPHM layers.

Each projection's weight is a sum of Kronecker products ``W = sum_i A_i kron B_i`` over
``phm_dim`` components, with the low-rank B_i = s_i t_i^T (``phm_rank``, 1 was best in
VL-Adapter) and one set of A_i shared by every adapter layer of a tower (the reference's
``shared_phm_rule``; ylsung/VL_adapter defaults: hypercomplex_division 4, phm_rank 1,
reduction factor 16). Placement and layer-norm training as for the bottleneck adapter. A
PHM layer from ``i`` to ``o`` features has ``rank * (i + o) + o`` parameters (independent of
``phm_dim``) plus the tower's shared ``phm_dim ** 3`` rule. Up-projection factors t start at
zero (the reference draws them from N(0, 0.01)), so the model starts exactly at the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.methods.bottleneck.config import ResidualAdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


@dataclass
class CompacterConfig(ResidualAdapterConfig):
    """Compacter: Kronecker components and the rank of their B factors."""

    method = "compacter"

    phm_dim: int = 4
    phm_rank: int = 1

    def validate(self, dims: ModelDims) -> None:
        super().validate(dims)
        if self.phm_dim < 1 or self.phm_rank < 1:
            raise ConfigError(f"adapter.phm_dim, adapter.phm_rank: {self.phm_dim}, {self.phm_rank} must be >= 1")
        for tower, hidden, _ in self.towers(dims):
            bottleneck = hidden // self.reduction_factor
            if hidden % self.phm_dim or bottleneck % self.phm_dim:
                raise ConfigError(f"adapter.phm_dim: {self.phm_dim} must divide the {tower} model's hidden size "
                                  f"{hidden} and its bottleneck {bottleneck}")

    def tower_params(self, hidden: int, bottleneck: int, layers: int) -> int:
        down = self.phm_rank * (hidden + bottleneck) + bottleneck
        up = self.phm_rank * (bottleneck + hidden) + hidden
        return self.phm_dim**3 + 2 * layers * (down + up)
