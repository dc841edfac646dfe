"""Hyperformer's modules: residual adapters whose weights a shared hypernetwork generates per layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.methods.bottleneck.modules import inject_residual
from qstudy.methods.hyperformer.config import HyperformerConfig
from qstudy.methods.layers import zero_linear
from qstudy.model.extension import Extension


class HyperAdapters(nn.Module):
    """Hyperformer++ for one tower: a hypernetwork generates each position's adapter weights.

    Position p = 2 * layer + (0 after attention, 1 after the feed-forward block). Its source
    embedding is ``task_projector([task; layer embedding; position embedding])``; linear
    generators map it to the adapter's down/up weights and biases. The up generators start at
    zero, so every generated adapter starts as the identity.
    """

    def __init__(self, hidden: int, bottleneck: int, num_layers: int, embedding_dim: int, projector_hidden: int):
        super().__init__()
        self.hidden, self.bottleneck = hidden, bottleneck
        self.task_embedding = nn.Parameter(torch.randn(embedding_dim))
        self.layer_embedding = nn.Parameter(torch.randn(num_layers, embedding_dim))
        self.position_embedding = nn.Parameter(torch.randn(2, embedding_dim))
        self.task_projector = nn.Sequential(nn.Linear(3 * embedding_dim, projector_hidden), nn.ReLU(),
                                            nn.Linear(projector_hidden, embedding_dim))
        self.down_weight = nn.Linear(embedding_dim, bottleneck * hidden)
        self.down_bias = nn.Linear(embedding_dim, bottleneck)
        # Generated down weights of about a fan-in initialised layer's scale.
        nn.init.normal_(self.down_weight.weight, std=(embedding_dim * hidden) ** -0.5)
        nn.init.zeros_(self.down_weight.bias)
        self.up_weight = zero_linear(embedding_dim, hidden * bottleneck)
        self.up_bias = zero_linear(embedding_dim, hidden)

    def forward(self, hidden_states: torch.Tensor, position: int) -> torch.Tensor:
        layer, kind = divmod(position, 2)
        source = self.task_projector(torch.cat([self.task_embedding, self.layer_embedding[layer],
                                                self.position_embedding[kind]]))
        down = self.down_weight(source).view(self.bottleneck, self.hidden)
        up = self.up_weight(source).view(self.hidden, self.bottleneck)
        bottleneck = F.gelu(F.linear(hidden_states, down, self.down_bias(source)))
        return hidden_states + F.linear(bottleneck, up, self.up_bias(source))


def inject(config: HyperformerConfig, captioner) -> Extension:
    return inject_residual(config, captioner, lambda hidden, bottleneck, layers: HyperAdapters(
        hidden, bottleneck, layers, config.embedding_dim, config.projector_hidden))
