"""ADEM-VL (Hao et al., IJCV 2025): parameter-free cross-attention fusion of multiscale visual features in the LM.

Followed from the reference code (Hao840/ADEM-VL: adem/adapter.py, adem/model.py,
adem/build.py, train.py defaults), mapped onto this captioner:

- Visual features: the vision tower's penultimate layer (the reference runs CLIP up to its
  last block and applies ``ln_post``; we take ``encoder_layers[-2]``'s output through the
  tower's ``post_layernorm``), patch tokens only, plus average-pooled coarser grids, all
  concatenated in one pass (reference ``down_sample_num`` [256, 64] = the grid and half of it;
  here ``pool_strides`` [1, 2]). Each frame contributes its tokens, so V holds frames x tokens.
- V = SiLU-MLP(features) (reference ``adapter_proj``, width ``hidden_proj`` 128) times
  ``visual_scale`` (reference ``beta`` 0.01).
- Fusion in every LM block, beside the feed-forward block on its normed input (reference
  ``forward_llama``): ``out = h + FFN(norm h) + s * F(norm h)`` with
  ``A = silu(x) @ silu(V + e1)^T`` and ``F = A @ (V + e2)``: no softmax, no Q/K/V weights;
  e1 ~ N(0, 0.02), e2 = 0, learned per visual token (for video: per frame and grid cell);
  ``s`` = ``scale`` (reference ``alpha`` 0.1).
- Adaptive fusion: each text token's lowest ``drop_ratio`` (0.1) share of scores is zeroed
  (the reference's sort-and-threshold).
- The LM sequence: visual tokens enter only through the fusion, plus one projected CLS token
  per clip. The reference projects CLIP's CLS with its own MLP; we project each frame's pooled
  CLS with the base's pretrained projector and average over frames, so the LM sees 1 visual
  token where the prefix methods feed it ``num_frames * (1 + frame_grid ** 2)`` (plus K per
  frame with Q-Adapter's ``queries_to_lm``); a base with a temporal merger adds its clip
  token to both.
- The reference also trains parallel adapters beside every CLIP MLP (``set_Clip_Adapter``:
  width ``adapter_dim`` 8, scale 0.1, dropout 0.1, zero-init output); here
  ``vision_adapter_dim`` (0 turns them off).

Fusion adds a non-zero term from the start (only e2 is zero), so it does not start at the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qstudy.methods.base import AdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


@dataclass
class AdemVLConfig(AdapterConfig):
    """ADEM-VL's fusion scales, adaptive drop, feature scales and the visual projection widths."""

    method = "ademvl"

    scale: float = 0.1
    visual_scale: float = 0.01
    drop_ratio: float = 0.1
    pool_strides: list[int] = field(default_factory=lambda: [1, 2])
    projection_hidden: int = 128
    vision_adapter_dim: int = 8

    def tokens_per_frame(self, grid: int) -> int:
        return sum((grid // stride) ** 2 for stride in self.pool_strides)

    def validate(self, dims: ModelDims) -> None:
        if dims.vision_layers < 2:
            raise ConfigError(f"adapter.method: ademvl reads the penultimate layer; the encoder has {dims.vision_layers}")
        grid = dims.vision_grid
        if grid is None:
            raise ConfigError("adapter.pool_strides: the vision encoder's config gives no image_size/patch_size grid")
        if not self.pool_strides:
            raise ConfigError("adapter.pool_strides: at least one scale is needed (1 = the full patch grid)")
        for stride in self.pool_strides:
            if stride < 1 or grid % stride:
                raise ConfigError(f"adapter.pool_strides: {stride} must be >= 1 and divide the {grid}x{grid} patch grid")
        if not 0 <= self.drop_ratio < 1:
            raise ConfigError(f"adapter.drop_ratio: {self.drop_ratio} must be in [0, 1)")
        if self.projection_hidden < 1:
            raise ConfigError(f"adapter.projection_hidden: {self.projection_hidden} must be >= 1")
        if self.vision_adapter_dim < 0:
            raise ConfigError(f"adapter.vision_adapter_dim: {self.vision_adapter_dim} must be >= 0 (0: none)")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        # The fusion reads the penultimate layer's output, so that layer must run.
        return 0 if self.vision_adapter_dim else dims.vision_layers - 2

    def extra_trainable(self, dims: ModelDims) -> int:
        d_vision, d_lm, hidden = dims.vision_hidden, dims.lm_hidden, self.projection_hidden
        vision_adapters = dims.vision_layers * 2 * d_vision * self.vision_adapter_dim
        projection = d_vision * hidden + hidden + hidden * d_lm + d_lm
        embeddings = 2 * dims.num_frames * self.tokens_per_frame(dims.vision_grid) * d_lm
        return vision_adapters + projection + embeddings
