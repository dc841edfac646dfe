"""Q-Adapter's modules: a query-token block with its gate after each insertion layer of the vision encoder."""

from __future__ import annotations

from qstudy.methods.layers import QueryAdapter, after_layer
from qstudy.methods.qadapter.config import QAdapterConfig, resolve_layers


def inject(config: QAdapterConfig, captioner) -> None:
    blocks = []
    for layer in resolve_layers(config.insertion_layers, captioner.dims.vision_layers):
        block = QueryAdapter(captioner.dims.vision_hidden, config.rank, config.num_query_tokens, config.gating)
        captioner.adapter_modules[f"qadapter_{layer}"] = block
        after_layer(captioner.encoder_layers[layer], block)
        blocks.append(block)
    if config.queries_to_lm:
        captioner.extra_frame_tokens.append(blocks[-1].query_tokens)
