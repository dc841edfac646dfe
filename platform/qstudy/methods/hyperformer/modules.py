"""Hyperformer's modules: residual adapters whose weights a shared hypernetwork generates per layer."""

from __future__ import annotations

from qstudy.methods.bottleneck.modules import inject_residual
from qstudy.methods.hyperformer.config import HyperformerConfig
from qstudy.methods.layers import HyperAdapters
from qstudy.model.extension import Extension


def inject(config: HyperformerConfig, captioner) -> Extension:
    return inject_residual(config, captioner, lambda hidden, bottleneck, layers: HyperAdapters(
        hidden, bottleneck, layers, config.embedding_dim, config.projector_hidden))
