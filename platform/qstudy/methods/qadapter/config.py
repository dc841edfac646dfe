"""Q-Adapter (Chen et al., ACM MM Asia 2025, arXiv 2510.10022): query tokens + gating in the vision encoder.

The paper's method section is not available to us; ``placement`` picks the documented reading
implemented, each applied at every insertion layer l of the vision encoder:

- ``side`` (the default; our reading, no paper to follow): the layer's output tokens are
  down-projected to rank r; K learnable query tokens attend to them (query-attention) and form
  a K-slot summary; the tokens then attend to that summary (read-back); the result is
  up-projected and added to the residual stream through the gate. The up-projection starts at
  zero under every gate but tanh (whose zero gate does the same), so it starts exactly at the
  base. With ``queries_to_lm`` the last insertion layer's query summary, up-projected, is
  passed to the LM as K extra tokens per frame.
- ``gated_attention`` (LLaMA-Adapter, Zhang et al. ICLR 2024, as peft's ``adaption_prompt``
  and lit-llama's port implement it): K learnable prompt tokens in the encoder's width become
  keys and values through layer l's own frozen k/v projections; the layer's tokens, through
  its frozen q projection, attend to them in a softmax of their own (apart from the tokens'
  attention to each other), per head; the result is gated and added to the attention's
  output before its frozen output projection. Our choices: the prompts enter the vision
  encoder (the paper adapts an LM's top layers, with ``insertion_layers`` for which), drawn
  from N(0, 1) as the reference's embedding is; the output projection is applied without its
  bias, so the sum is the layer's own projection of (attention + gated prompt attention).
  ``rank`` does not apply (nothing is projected down) and ``queries_to_lm`` is refused: the
  prompts are keys and values only, nothing reads them out.
- ``sequence``: K learnable tokens of layer l's own join its input sequence, after the patch
  tokens, without position embeddings, and are dropped from its output. ``sequence_mode``:
  ``vpt`` (VPT-deep, Jia et al. ECCV 2022): they pass through the layer's own forward, so the
  patches attend to them and they to the patches; ``vqt`` (Visual Query Tuning, Tu et al.
  CVPR 2023): read out only, keys and values come from the original tokens alone, so the
  tokens' own outputs are the base's (the layer runs on them untouched; the queries go through
  its norms, attention projections and MLP on their own). Our choices: the tokens enter at the
  insertion layers only (the papers: every layer, which ``insertion_layers: all`` gives), drawn
  from N(0, 1/D); with ``queries_to_lm`` every insertion layer's K outputs join the LM's input
  per frame (VQT's read-out of all layers; VPT drops them, ``queries_to_lm: false``). ``vqt``
  needs ``queries_to_lm``, or its queries reach nothing. Neither ``rank`` nor ``gating``
  applies: the tokens join the layer's softmax rather than adding a gated update.

Gates (``gating``): ``none``; ``tanh`` of one zero-init scalar; ``sigmoid``, per channel of a
zero-init vector (0.5 at the start); ``per_head``, one zero-init factor per attention head
applied as it is (lit-llama's LLaMA-Adapter; peft uses one scalar), ``gated_attention`` only;
``token``, ``sigmoid(w . x + b)`` per token of the layer's input x, w and b zero-init (0.5 at
the start; our choice: an input-dependent gate has no paper here).

Where it starts: ``side`` starts exactly at the base under every gate (zero up-projection or
zero gate), unless ``queries_to_lm`` gives the LM K more tokens. ``gated_attention`` starts
at the base under ``tanh`` and ``per_head`` (zero gates, LLaMA-Adapter's point); under
``none``, ``sigmoid`` and ``token`` the prompts' attention adds from the first step, as nothing
behind those gates starts at zero (the prompts pass through the frozen projections).
``sequence`` never does: under ``vpt`` the tokens take a share of every patch's softmax from
the start (no zero init can hide a key from a softmax), and ``vqt`` changes only the LM's
input, which ``queries_to_lm`` lengthens.
Only the Q-Adapter modules and the projector train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

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


# The fields only some placements use, and those placements.
FIELD_PLACEMENTS = {"rank": ("side",), "gating": ("side", "gated_attention"), "sequence_mode": ("sequence",)}


@dataclass
class QAdapterConfig(AdapterConfig):
    """Q-Adapter hyperparameters: the study's main search space."""

    method = "qadapter"

    # side: a query-token block beside each insertion layer; gated_attention: LLaMA-Adapter's
    # prompts in its attention; sequence: tokens in its input sequence (VPT-deep, VQT)
    placement: Literal["side", "gated_attention", "sequence"] = "side"
    # K: the side block's query tokens, gated_attention's prompts, or the tokens sequence adds
    num_query_tokens: int = 8
    insertion_layers: str | list[int] = "last:2"
    # side and gated_attention (per_head: gated_attention only); sequence has no gate
    gating: Literal["none", "tanh", "sigmoid", "per_head", "token"] = "tanh"
    # the side block's width; the other placements have none
    rank: int = 16
    # sequence only: vpt, the tokens attend with the patches; vqt, they read them out only
    sequence_mode: Literal["vpt", "vqt"] = "vpt"
    # side: the last block's K query summaries join the LM's input per frame; sequence: every
    # insertion layer's K token outputs do
    queries_to_lm: bool = False
    # layers() memo: (insertion_layers, encoder depth) -> 0-based layers. It travels with the
    # pickled config, so the sampler's resolution serves the trial's worker too.
    _layers: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    conditional_fields: ClassVar[frozenset[str]] = frozenset(FIELD_PLACEMENTS)

    @property
    def starts_at_base(self) -> bool:  # the module docstring says why each combination does or does not
        if self.queries_to_lm or self.placement == "sequence":
            return False  # extra LM tokens, or extra keys in the patches' softmax, change outputs from the start
        return self.placement == "side" or self.gating in ("tanh", "per_head")

    def uses(self, name: str) -> bool:
        return self.placement in FIELD_PLACEMENTS.get(name, (self.placement,))

    def layers(self, dims: ModelDims) -> list[int]:
        """The 0-based encoder layers ``insertion_layers`` selects, resolved once per spec and depth."""
        spec = tuple(self.insertion_layers) if isinstance(self.insertion_layers, list) else self.insertion_layers
        key = (spec, dims.vision_layers)
        if key not in self._layers:
            self._layers[key] = resolve_layers(self.insertion_layers, dims.vision_layers)
        return list(self._layers[key])

    def validate(self, dims: ModelDims) -> None:
        self.layers(dims)
        if self.uses("rank") and not 1 <= self.rank <= dims.vision_hidden:
            raise ConfigError(f"adapter.rank: {self.rank} must be in 1..{dims.vision_hidden} (the encoder's hidden size)")
        if self.num_query_tokens < 1:
            raise ConfigError(f"adapter.num_query_tokens: {self.num_query_tokens} must be >= 1")
        if self.uses("gating") and self.gating == "per_head":
            if self.placement != "gated_attention":
                raise ConfigError(f"adapter.gating: per_head gates attention heads; placement {self.placement} has "
                                  "none (per_head needs placement gated_attention)")
            if not dims.vision_heads:
                raise ConfigError("adapter.gating: per_head needs the vision encoder's num_attention_heads, "
                                  "which its config does not give")
        if self.queries_to_lm and self.placement == "gated_attention":
            raise ConfigError("adapter.queries_to_lm: placement gated_attention's prompts are keys and values "
                              "only; it has no query outputs to pass to the LM")
        if self.placement == "sequence" and self.sequence_mode == "vqt" and not self.queries_to_lm:
            raise ConfigError("adapter.queries_to_lm: sequence_mode vqt only reads out; without queries_to_lm "
                              "its queries reach nothing")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return self.layers(dims)[0]

    def gate_params(self, dims: ModelDims) -> int:
        hidden = dims.vision_hidden
        if not self.uses("gating"):
            return 0
        return {"none": 0, "tanh": 1, "sigmoid": hidden, "per_head": dims.vision_heads, "token": hidden + 1}[self.gating]

    def extra_trainable(self, dims: ModelDims) -> int:
        hidden, rank, k = dims.vision_hidden, self.rank, self.num_query_tokens
        if self.placement == "side":
            per_layer = (hidden * rank + rank) + k * rank + (rank * hidden + hidden)
        else:  # gated_attention and sequence: the tokens; the projections are the layer's own, frozen
            per_layer = k * hidden
        return (per_layer + self.gate_params(dims)) * len(self.layers(dims))
