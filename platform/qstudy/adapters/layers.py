"""The adapters' torch modules and the hook that splices a module into a vision encoder layer.

Method configs stay torch-free (the sampler counts parameters without torch); their
``inject`` imports the modules they need from here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Gate(nn.Module):
    """Scales an adapter's update: none (1), tanh of a zero-init scalar, or per-channel sigmoid."""

    def __init__(self, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        if kind == "tanh":
            self.value = nn.Parameter(torch.zeros(1))
        elif kind == "sigmoid":
            self.value = nn.Parameter(torch.zeros(hidden))
        elif kind != "none":
            raise ValueError(f"unknown gating {kind!r}")

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        if self.kind == "tanh":
            return torch.tanh(self.value) * update
        if self.kind == "sigmoid":
            return torch.sigmoid(self.value) * update
        return update


class QueryAdapter(nn.Module):
    """Q-Adapter block: K queries summarise the layer's tokens in rank r; the tokens read it back.

    tokens (B, N, D) -> down (B, N, r) -> queries attend to them: summary (B, K, r) ->
    tokens attend to the summary (B, N, r) -> up (B, N, D) -> gated residual update.
    """

    def __init__(self, hidden: int, rank: int, num_query_tokens: int, gating: str):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.queries = nn.Parameter(torch.randn(num_query_tokens, rank) * rank**-0.5)
        self.up = nn.Linear(rank, hidden)
        self.gate = Gate(gating, hidden)
        if gating != "tanh":
            # Without a zero-init gate, a zero-init up-projection makes the block start as identity.
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.summary: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = self.down(hidden_states)
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        self.summary = F.scaled_dot_product_attention(queries, tokens, tokens)
        readback = F.scaled_dot_product_attention(tokens, self.summary, self.summary)
        return hidden_states + self.gate(self.up(readback))

    def query_tokens(self) -> torch.Tensor:
        """The last forward's query summary in the encoder's width: extra visual tokens."""
        return self.up(self.summary)


def after_layer(layer: nn.Module, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Apply ``module`` to ``layer``'s output hidden states (a tensor, or the first of a tuple)."""

    def hook(_layer, _args, output):
        if isinstance(output, tuple):
            return (module(output[0]),) + output[1:]
        return module(output)

    return layer.register_forward_hook(hook)
