"""ADEM-VL's modules: the parameter-free multiscale fusion in every LM block and the parallel vision adapters."""

from __future__ import annotations

import torch
from torch import nn

from qstudy.methods.ademvl.config import AdemVLConfig
from qstudy.methods.layers import FEED_FORWARD_NAMES, MultiscaleFusion, ParallelAdapter, beside_sublayer, sublayer
from qstudy.model.extension import Extension, Slot

# The reference's set_Clip_Adapter scale; kept as published rather than searched, like its dropout.
VISION_ADAPTER_SCALE = 0.1
PENULTIMATE = -2  # hidden_states[-2]: the output of the encoder's penultimate layer


def inject(config: AdemVLConfig, captioner) -> Extension:
    dims = captioner.dims
    modules, handles = {}, []
    if config.vision_adapter_dim:
        adapters = nn.ModuleList(ParallelAdapter(dims.vision_hidden, config.vision_adapter_dim, scale=VISION_ADAPTER_SCALE)
                                 for _ in captioner.encoder_layers)
        modules["ademvl_vision"] = adapters
        for layer, adapter in zip(captioner.encoder_layers, adapters):
            handles.append(beside_sublayer(sublayer(layer, FEED_FORWARD_NAMES), adapter))
    fusion = MultiscaleFusion(dims.vision_hidden, dims.lm_hidden, dims.vision_grid, config.pool_strides,
                              dims.num_frames, config.projection_hidden, config.scale, config.visual_scale,
                              config.drop_ratio)
    modules["ademvl_fusion"] = fusion
    # Each LM row's V reaches the fusion inside the LM's blocks, which take only hidden states, through here.
    visual = Slot[torch.Tensor]("ADEM-VL's visual features")
    for block in captioner.lm_blocks:
        handles.append(beside_sublayer(sublayer(block, FEED_FORWARD_NAMES), lambda normed: fusion(normed, visual.get())))
    post_layernorm = captioner.vision.post_layernorm
    return Extension(
        modules=modules, handles=handles, hidden_states=(PENULTIMATE,),
        prefix=lambda prefix: clip_cls_token(prefix, dims.num_frames),
        clip_state=lambda vision: fusion.features(post_layernorm(vision.hidden_states[PENULTIMATE])),
        condition=visual.put,
    )


def clip_cls_token(prefix, num_frames: int):
    """(batch, frames * tokens, d) prefix -> (batch, 1, d): the frames' projected pooled (CLS) tokens, averaged.

    Each frame's tokens start with its pooled token; the rest (pooled patch grid, adapter
    tokens) reach the LM through the fusion instead.
    """
    return prefix.unflatten(1, (num_frames, -1))[:, :, 0].mean(dim=1, keepdim=True)
