"""Compacter's modules: residual adapters whose projections are sums of Kronecker products."""

from __future__ import annotations

from qstudy.methods.bottleneck.modules import inject_residual
from qstudy.methods.compacter.config import CompacterConfig
from qstudy.methods.layers import CompacterAdapters
from qstudy.model.extension import Extension


def inject(config: CompacterConfig, captioner) -> Extension:
    return inject_residual(config, captioner, lambda hidden, bottleneck, layers: CompacterAdapters(
        hidden, bottleneck, 2 * layers, config.phm_dim, config.phm_rank))
