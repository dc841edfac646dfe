"""Q-Adapter (Chen et al., ACM MM Asia 2025, arXiv 2510.10022): query tokens + gating in the vision encoder.

The paper's method section is not available to us; this is the documented reading it is
implemented from. At each insertion layer l the layer's output tokens are down-projected
to rank r; K learnable query tokens attend to them (query-attention) and form a K-slot
summary; the tokens then attend to that summary (read-back); the result is up-projected
and added to the residual stream through a gate (none | tanh of a zero-init scalar |
per-channel sigmoid). With the tanh gate (or the zero-init up-projection the other gates
use) the adapted model starts exactly at the base model. Optionally the last insertion
layer's query summary, up-projected, is passed to the LM as K extra tokens per frame.
Only the blocks and the projector train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qstudy.methods.base import AdapterConfig
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


def resolve_layers(spec: str | list[int], num_layers: int, where: str = "adapter.insertion_layers") -> list[int]:
    """``[1, 3]``, ``"all"``, ``"last:N"`` or ``"every:N"`` -> sorted 0-based layer indices."""
    if isinstance(spec, list):
        layers = spec
    elif spec == "all":
        layers = list(range(num_layers))
    elif isinstance(spec, str) and spec.partition(":")[0] in ("last", "every") and spec.partition(":")[2].isdigit():
        kind, _, count = spec.partition(":")
        count = int(count)
        if count < 1:
            raise ConfigError(f"{where}: {spec!r} needs a positive count")
        if kind == "last" and count > num_layers:
            raise ConfigError(f"{where}: {spec!r} asks for more layers than the encoder's {num_layers}")
        layers = list(range(num_layers - count, num_layers)) if kind == "last" else list(range(count - 1, num_layers, count))
    else:
        raise ConfigError(f"{where}: {spec!r} is not a list of layers, 'all', 'last:N' or 'every:N'")
    if not layers:
        raise ConfigError(f"{where}: selects no layer")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ConfigError(f"{where}: layer {bad[0]} is beyond the encoder's {num_layers} layers (0..{num_layers - 1})")
    return sorted(set(layers))


@dataclass
class QAdapterConfig(AdapterConfig):
    """Q-Adapter hyperparameters: the study's main search space."""

    method = "qadapter"

    num_query_tokens: int = 8
    insertion_layers: str | list[int] = "last:2"
    gating: Literal["none", "tanh", "sigmoid"] = "tanh"
    rank: int = 16
    queries_to_lm: bool = False
    # layers() memo: (insertion_layers, encoder depth) -> 0-based layers. It travels with the
    # pickled config, so the sampler's resolution serves the trial's worker too.
    _layers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def starts_at_base(self) -> bool:  # extra LM tokens change the LM's input from the start
        return not self.queries_to_lm

    def layers(self, dims: ModelDims) -> list[int]:
        """The 0-based encoder layers ``insertion_layers`` selects, resolved once per spec and depth."""
        spec = tuple(self.insertion_layers) if isinstance(self.insertion_layers, list) else self.insertion_layers
        key = (spec, dims.vision_layers)
        if key not in self._layers:
            self._layers[key] = resolve_layers(self.insertion_layers, dims.vision_layers)
        return list(self._layers[key])

    def validate(self, dims: ModelDims) -> None:
        self.layers(dims)
        if not 1 <= self.rank <= dims.vision_hidden:
            raise ConfigError(f"adapter.rank: {self.rank} must be in 1..{dims.vision_hidden} (the encoder's hidden size)")
        if self.num_query_tokens < 1:
            raise ConfigError(f"adapter.num_query_tokens: {self.num_query_tokens} must be >= 1")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return self.layers(dims)[0]

    def extra_trainable(self, dims: ModelDims) -> int:
        hidden, rank = dims.vision_hidden, self.rank
        gate = {"none": 0, "tanh": 1, "sigmoid": hidden}[self.gating]
        per_layer = (hidden * rank + rank) + self.num_query_tokens * rank + (rank * hidden + hidden) + gate
        return per_layer * len(self.layers(dims))
