"""ADEM-VL's modules: the parameter-free multiscale fusion in every LM block and the parallel vision adapters."""

from __future__ import annotations

from functools import partial

from torch import nn

from qstudy.methods.ademvl.config import AdemVLConfig
from qstudy.methods.layers import FEED_FORWARD_NAMES, MultiscaleFusion, ParallelAdapter, beside_sublayer, sublayer


def inject(config: AdemVLConfig, captioner) -> None:
    dims = captioner.dims
    if config.vision_adapter_dim:
        adapters = nn.ModuleList(ParallelAdapter(dims.vision_hidden, config.vision_adapter_dim, scale=0.1)
                                 for _ in captioner.encoder_layers)
        captioner.adapter_modules["ademvl_vision"] = adapters
        for layer, adapter in zip(captioner.encoder_layers, adapters):
            beside_sublayer(sublayer(layer, FEED_FORWARD_NAMES), adapter)
    fusion = MultiscaleFusion(dims.vision_hidden, dims.lm_hidden, dims.vision_grid, config.pool_strides,
                              dims.num_frames, config.projection_hidden, config.scale, config.visual_scale,
                              config.drop_ratio)
    captioner.adapter_modules["ademvl_fusion"] = fusion
    post_layernorm = captioner.vision.post_layernorm
    captioner.encoder_layers[-2].register_forward_hook(
        lambda _layer, _args, output: fusion.capture(post_layernorm(output[0] if isinstance(output, tuple) else output)))
    for block in captioner.lm_blocks:
        beside_sublayer(sublayer(block, FEED_FORWARD_NAMES), fusion)
    captioner.prefix_hooks.append(partial(clip_cls_token, num_frames=dims.num_frames))
    captioner.row_hooks.append(fusion.select_rows)


def clip_cls_token(prefix, num_frames: int):
    """(batch, frames * tokens, d) prefix -> (batch, 1, d): the frames' projected pooled (CLS) tokens, averaged.

    Each frame's tokens start with its pooled token; the rest (pooled patch grid, adapter
    tokens) reach the LM through the fusion instead.
    """
    return prefix.unflatten(1, (num_frames, -1))[:, :, 0].mean(dim=1, keepdim=True)
