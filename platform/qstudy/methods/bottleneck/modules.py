"""Residual adapters' placement (shared by Compacter and Hyperformer) and the bottleneck's modules."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.core.dims import is_norm_module
from qstudy.methods.bottleneck.config import BottleneckConfig, ResidualAdapterConfig
from qstudy.methods.layers import ATTENTION_NAMES, FEED_FORWARD_NAMES, after_layer, sublayer, zero_linear
from qstudy.model.extension import Extension


class BottleneckAdapters(nn.Module):
    """Houlsby adapters of one tower: ``x + up(gelu(down(x)))`` at each position, optionally shared.

    ``sharing``: none (own down/up per position), single (one adapter at every position), half
    (one shared down-projection, own up-projection per position). Up-projections start at zero.
    """

    def __init__(self, hidden: int, bottleneck: int, positions: int, sharing: str):
        super().__init__()
        self.down = nn.ModuleList(nn.Linear(hidden, bottleneck) for _ in range(positions if sharing == "none" else 1))
        self.up = nn.ModuleList(zero_linear(bottleneck, hidden) for _ in range(1 if sharing == "single" else positions))

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        down = self.down[position % len(self.down)]
        up = self.up[position % len(self.up)]
        return hidden_states + up(F.gelu(down(hidden_states)))


# (hidden, bottleneck, layers) -> the module holding one tower's adapters, called as module(hidden_states, position)
TowerAdapters = Callable[[int, int, int], nn.Module]


def inject_residual(config: ResidualAdapterConfig, captioner, tower_adapters: TowerAdapters) -> Extension:
    """An adapter after the attention and the feed-forward sublayer of every layer of each targeted tower."""
    extension = Extension()
    for tower, hidden, layers in config.towers(captioner.dims):
        adapters = tower_adapters(hidden, hidden // config.reduction_factor, layers)
        extension.modules[f"{config.method}_{tower}"] = adapters
        blocks = captioner.encoder_layers if tower == "vision" else captioner.lm_blocks
        for layer, block in enumerate(blocks):
            for kind, names in enumerate((ATTENTION_NAMES, FEED_FORWARD_NAMES)):
                extension.handles.append(after_layer(sublayer(block, names), partial(adapters, position=2 * layer + kind)))
        if config.unfreeze_layer_norms:
            for name, module in getattr(captioner, tower).named_modules():
                if is_norm_module(name):
                    module.requires_grad_(True)
    return extension


def inject(config: BottleneckConfig, captioner) -> Extension:
    return inject_residual(config, captioner, lambda hidden, bottleneck, layers: BottleneckAdapters(
        hidden, bottleneck, 2 * layers, config.sharing))
