"""Prompt tuning (as an arm of VL-Adapter): learnable vectors prepended to the language model's input.

The prompts come before the visual prefix and the caption; only they (and the projector)
train. With ``mid_dim`` they pass through VL-Adapter's reparametrisation MLP
(hidden -> mid_dim -> hidden, tanh), which the reference code (ylsung/VL_adapter, ``mid_dim``
768 by default) uses to steady training; without it the vectors are the prompts. Prompts are
drawn at the scale of the LM's token embeddings. The LM sees ``prompt_length`` more tokens,
so the model does not start at the base.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.methods.base import AdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Number of prompt vectors and the optional reparametrisation width."""

    method = "prompt_tuning"

    prompt_length: int = 8
    mid_dim: int | None = None

    def validate(self, dims: ModelDims) -> None:
        if self.prompt_length < 1:
            raise ConfigError(f"adapter.prompt_length: {self.prompt_length} must be >= 1")
        if self.mid_dim is not None and self.mid_dim < 1:
            raise ConfigError(f"adapter.mid_dim: {self.mid_dim} must be >= 1 (or null for no reparametrisation)")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return dims.vision_layers

    def extra_trainable(self, dims: ModelDims) -> int:
        d = dims.lm_hidden
        reparametrisation = 0 if self.mid_dim is None else 2 * d * self.mid_dim + self.mid_dim + d
        return self.prompt_length * d + reparametrisation
