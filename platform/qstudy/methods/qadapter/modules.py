"""Q-Adapter's modules: a query-token block with its gate after each insertion layer of the vision encoder."""

from __future__ import annotations

import torch

from qstudy.methods.layers import QueryAdapter, after_layer
from qstudy.methods.qadapter.config import QAdapterConfig
from qstudy.model.extension import Extension, Slot


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
