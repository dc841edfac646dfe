"""Compacter's modules: residual adapters whose projections are sums of Kronecker products."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.methods.bottleneck.modules import inject_residual
from qstudy.methods.compacter.config import CompacterConfig
from qstudy.model.extension import Extension


class LowRankPHM(nn.Module):
    """LPHM layer (Compacter): ``W = sum_i A_i kron (s_i t_i^T)``; the rule A is passed in (shared).

    Factors are scaled so W starts with the variance of a fan-in initialised dense layer;
    ``zero_init`` zeroes t (the up-projection's), so the layer starts at exactly zero.
    """

    def __init__(self, in_features: int, out_features: int, phm_dim: int, rank: int, zero_init: bool):
        super().__init__()
        self.left = nn.Parameter(torch.randn(phm_dim, in_features // phm_dim, rank))
        right_shape = (phm_dim, rank, out_features // phm_dim)
        self.right = nn.Parameter(torch.zeros(right_shape) if zero_init
                                  else torch.randn(right_shape) * (in_features * rank) ** -0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, inputs: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        blocks = self.left @ self.right  # (n, in/n, out/n)
        n, rows, cols = blocks.shape
        # sum_i kron(A_i, B_i)[a * rows + b, c * cols + d] = sum_i A_i[a, c] B_i[b, d]
        weight = torch.einsum("iac,ibd->abcd", rule, blocks).reshape(n * rows, n * cols)
        return inputs @ weight + self.bias


class CompacterAdapters(nn.Module):
    """Compacter adapters of one tower: LPHM down/up per position around a GELU; one shared rule A."""

    def __init__(self, hidden: int, bottleneck: int, positions: int, phm_dim: int, rank: int):
        super().__init__()
        self.rule = nn.Parameter(torch.randn(phm_dim, phm_dim, phm_dim) * phm_dim**-0.5)
        self.down = nn.ModuleList(LowRankPHM(hidden, bottleneck, phm_dim, rank, False) for _ in range(positions))
        self.up = nn.ModuleList(LowRankPHM(bottleneck, hidden, phm_dim, rank, True) for _ in range(positions))

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        bottleneck = F.gelu(self.down[position](hidden_states, self.rule))
        return hidden_states + self.up[position](bottleneck, self.rule)


def inject(config: CompacterConfig, captioner) -> Extension:
    return inject_residual(config, captioner, lambda hidden, bottleneck, layers: CompacterAdapters(
        hidden, bottleneck, 2 * layers, config.phm_dim, config.phm_rank))
