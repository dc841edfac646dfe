"""Q-Adapter's modules: a query-token block with its gate after each insertion layer of the vision encoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.methods.layers import Gate, after_layer
from qstudy.methods.qadapter.config import QAdapterConfig
from qstudy.model.extension import Extension, Slot


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

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (updated tokens (B, N, D), the queries' summary (B, K, r))."""
        tokens = self.down(hidden_states)
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        summary = F.scaled_dot_product_attention(queries, tokens, tokens)
        readback = F.scaled_dot_product_attention(tokens, summary, summary)
        return hidden_states + self.gate(self.up(readback)), summary

    def query_tokens(self, summary: torch.Tensor) -> torch.Tensor:
        """A forward's query summary in the encoder's width: extra visual tokens (B, K, D)."""
        return self.up(summary)


def inject(config: QAdapterConfig, captioner) -> Extension:
    extension = Extension()
    layers = config.layers(captioner.dims)
    # The last block's query tokens leave the tower's forward, which returns only hidden states, through here.
    queries = Slot[torch.Tensor]("Q-Adapter's query tokens")
    for layer in layers:
        block = QueryAdapter(captioner.dims.vision_hidden, config.rank, config.num_query_tokens, config.gating)
        extension.modules[f"qadapter_{layer}"] = block
        emits = queries if config.queries_to_lm and layer == layers[-1] else None
        extension.handles.append(after_layer(captioner.encoder_layers[layer],
                                             lambda hidden, block=block, emits=emits: _adapt(hidden, block, emits)))
    if config.queries_to_lm:
        extension.frame_tokens = lambda _vision: queries.get()
    return extension


def _adapt(hidden: torch.Tensor, block: QueryAdapter, queries: Slot | None) -> torch.Tensor:
    """One block's update of a layer's output; its query tokens go to ``queries`` when the LM reads them."""
    updated, summary = block(hidden)
    if queries is not None:
        queries.put(block.query_tokens(summary))
    return updated
