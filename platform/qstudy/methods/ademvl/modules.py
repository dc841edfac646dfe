"""ADEM-VL's modules: the parameter-free multiscale fusion in every LM block and the parallel vision adapters."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.methods.ademvl.config import AdemVLConfig
from qstudy.methods.layers import FEED_FORWARD_NAMES, sublayer
from qstudy.model.extension import Extension, Slot


class ParallelAdapter(nn.Module):
    """ADEM-VL's vision-side adapter: ``scale * fc2(dropout(gelu(fc1(x))))`` beside a block's MLP; fc2 starts at zero."""

    def __init__(self, hidden: int, dim: int, scale: float, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(hidden, dim, bias=False)
        self.fc2 = nn.Linear(dim, hidden, bias=False)
        nn.init.zeros_(self.fc2.weight)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.dropout(F.gelu(self.fc1(hidden_states))))


class MultiscaleFusion(nn.Module):
    """ADEM-VL's parameter-free cross-attention from the LM's tokens onto multiscale visual features.

    ``features`` turns a frame batch's penultimate-layer tokens into V (batch, frames * tokens,
    lm_hidden): the patch grid and its average-pooled coarser grids, concatenated, through a
    SiLU MLP, times ``visual_scale``. ``forward(x, V)`` returns ``scale * A @ (V + e2)`` with
    ``A = silu(x) @ silu(V + e1)^T``, each text token's lowest ``drop_ratio`` share of scores
    set to zero. e1 and e2 are learned per visual token position (frame and grid cell).
    """

    def __init__(self, vision_hidden: int, lm_hidden: int, grid: int, pool_strides: list[int], num_frames: int,
                 projection_hidden: int, scale: float, visual_scale: float, drop_ratio: float):
        super().__init__()
        self.grid, self.pool_strides, self.num_frames = grid, pool_strides, num_frames
        self.scale, self.visual_scale, self.drop_ratio = scale, visual_scale, drop_ratio
        self.visual_projection = nn.Sequential(nn.Linear(vision_hidden, projection_hidden), nn.SiLU(),
                                               nn.Linear(projection_hidden, lm_hidden))
        for linear in (self.visual_projection[0], self.visual_projection[2]):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        tokens = num_frames * sum((grid // stride) ** 2 for stride in pool_strides)
        self.key_embedding = nn.Parameter(torch.randn(tokens, lm_hidden) * 0.02)  # e1
        self.value_embedding = nn.Parameter(torch.zeros(tokens, lm_hidden))  # e2

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch * frames, tokens, vision_hidden), already normed -> V (batch, frames * tokens, lm_hidden)."""
        patches = hidden_states[:, -self.grid**2:]  # CLIP puts its CLS first; SigLIP has none
        grid = patches.transpose(1, 2).unflatten(2, (self.grid, self.grid))
        scales = [grid if stride == 1 else F.avg_pool2d(grid, stride) for stride in self.pool_strides]
        multiscale = torch.cat([scale.flatten(2) for scale in scales], dim=2).transpose(1, 2)
        visual = self.visual_projection(multiscale) * self.visual_scale
        return visual.reshape(-1, self.num_frames * visual.shape[1], visual.shape[2])

    def forward(self, normed: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Text tokens (rows, tokens, lm_hidden) and each row's V (rows, visual tokens, lm_hidden) -> the update."""
        if visual.shape[0] != normed.shape[0]:
            raise ValueError(f"fusion: {normed.shape[0]} text rows but V for {visual.shape[0]}")
        scores = F.silu(normed) @ F.silu(visual + self.key_embedding).transpose(1, 2)
        drop = int(self.drop_ratio * scores.shape[-1])
        if drop > 0:
            threshold = scores.kthvalue(drop + 1, dim=-1, keepdim=True).values
            scores = scores * (scores >= threshold)
        return self.scale * (scores @ (visual + self.value_embedding))


# The reference's set_Clip_Adapter scale; kept as published rather than searched, like its dropout.
VISION_ADAPTER_SCALE = 0.1
PENULTIMATE = -2  # hidden_states[-2]: the output of the encoder's penultimate layer


def beside_sublayer(layer: nn.Module, branch) -> torch.utils.hooks.RemovableHandle:
    """Add ``branch(input)`` to ``layer``'s output: a branch parallel to it on the same (normed) input."""

    def hook(_layer, args, output):
        return output + branch(args[0])

    return layer.register_forward_hook(hook)


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
