"""Q-Adapter's modules per insertion layer of the vision encoder: side block, gated prompt attention, sequence tokens; gates."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qstudy.methods.layers import ATTENTION_NAMES, after_layer, sublayer
from qstudy.methods.qadapter.config import QAdapterConfig
from qstudy.model.extension import Extension, Slot


class Gate(nn.Module):
    """Scales an update: none (1), tanh of a zero-init scalar, per-channel sigmoid, per-head factor, or per-token sigmoid.

    ``per_head`` multiplies each head's slice of the last dimension (heads x head width, as
    attention concatenates them) by a zero-init factor; ``token`` multiplies each token's update
    by ``sigmoid(w . x + b)`` of that token's input ``x`` (w, b zero-init).
    """

    def __init__(self, kind: str, hidden: int, heads: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "tanh":
            self.value = nn.Parameter(torch.zeros(1))
        elif kind == "sigmoid":
            self.value = nn.Parameter(torch.zeros(hidden))
        elif kind == "per_head":
            self.value = nn.Parameter(torch.zeros(heads, 1))
        elif kind == "token":
            self.value = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value.weight)
            nn.init.zeros_(self.value.bias)
        elif kind != "none":
            raise ValueError(f"unknown gating {kind!r}")

    def forward(self, update: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``update`` (..., D) scaled; ``inputs`` (..., D) are the tokens it was computed from (read by ``token``)."""
        if self.kind == "tanh":
            return torch.tanh(self.value) * update
        if self.kind == "sigmoid":
            return torch.sigmoid(self.value) * update
        if self.kind == "per_head":
            return (update.unflatten(-1, (self.value.shape[0], -1)) * self.value).flatten(-2)
        if self.kind == "token":
            return torch.sigmoid(self.value(inputs)) * update
        return update


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
        return hidden_states + self.gate(self.up(readback), hidden_states), summary

    def query_tokens(self, summary: torch.Tensor) -> torch.Tensor:
        """A forward's query summary in the encoder's width: extra visual tokens (B, K, D)."""
        return self.up(summary)


class PromptAttention(nn.Module):
    """LLaMA-Adapter's zero-init attention on a frozen vision layer: its tokens attend to K learnable prompts.

    The prompts become keys and values through the layer's own (frozen) k/v projections, the
    tokens queries through its q projection; per head, a softmax over the prompts alone, then
    the gate, then the layer's output projection without its bias: an update to the attention's
    output. The attention module is passed in, not kept, so its weights stay the base's alone.
    """

    def __init__(self, hidden: int, heads: int, num_prompts: int, gating: str):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(num_prompts, hidden))
        self.gate = Gate(gating, hidden, heads)

    def forward(self, hidden_states: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        """The attention's input (B, N, D) -> the update to its output (B, N, D)."""
        heads = attention.num_heads
        prompts = self.prompts.to(hidden_states.dtype)
        queries = attention.q_proj(hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)
        keys, values = (projection(prompts).unflatten(-1, (heads, -1)).transpose(0, 1).expand(len(queries), -1, -1, -1)
                        for projection in (attention.k_proj, attention.v_proj))  # (B, H, K, d)
        attended = F.scaled_dot_product_attention(queries, keys, values, scale=attention.scale)
        return F.linear(self.gate(attended.transpose(1, 2).flatten(2), hidden_states), attention.out_proj.weight)


class ReadOutQueries(nn.Module):
    """VQT's query tokens at one pre-norm encoder layer: they pass through its modules, reading the original tokens only.

    ``x + attention(norm1 x)`` then ``+ mlp(norm2 .)``, as the layer computes its tokens, with
    the queries' own queries and keys and values from the layer's (normed) input tokens alone.
    The layer's modules are passed in, not kept, so its weights stay the base's alone.
    """

    def __init__(self, hidden: int, num_queries: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden**-0.5)

    def forward(self, hidden_states: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The layer's input tokens (B, N, D) -> the queries' outputs (B, K, D)."""
        attention = layer.self_attn
        heads = attention.num_heads
        queries = self.queries.to(hidden_states.dtype).expand(len(hidden_states), -1, -1)
        normed = layer.layer_norm1(hidden_states)
        q = attention.q_proj(layer.layer_norm1(queries)).unflatten(-1, (heads, -1)).transpose(1, 2)
        k, v = (projection(normed).unflatten(-1, (heads, -1)).transpose(1, 2)
                for projection in (attention.k_proj, attention.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v, scale=attention.scale).transpose(1, 2).flatten(2)
        queries = queries + attention.out_proj(attended)
        return queries + layer.mlp(layer.layer_norm2(queries))


class SequenceTokens(nn.Module):
    """VPT-deep's prompts at one layer: K tokens appended to its input sequence, split off its output."""

    def __init__(self, hidden: int, num_tokens: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, hidden) * hidden**-0.5)

    def append(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens.to(hidden_states.dtype).expand(len(hidden_states), -1, -1)
        return torch.cat([hidden_states, tokens], dim=1)

    def split(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's output (B, N + K, D) -> (the original tokens' (B, N, D), the prompts' (B, K, D))."""
        count = len(self.tokens)
        return hidden_states[:, :-count], hidden_states[:, -count:]


def inject(config: QAdapterConfig, captioner) -> Extension:
    injects = {"side": _inject_side, "gated_attention": _inject_gated_attention, "sequence": _inject_sequence}
    return injects[config.placement](config, captioner)


def _inject_side(config: QAdapterConfig, captioner) -> Extension:
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


def _require(module: nn.Module, names: tuple[str, ...], placement: str) -> None:
    """A placement that computes with a layer's own modules names those it misses (CLIP and SigLIP have them all)."""
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise ValueError(f"placement {placement}: {type(module).__name__} has no {', '.join(missing)}")


ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale")


def _inject_gated_attention(config: QAdapterConfig, captioner) -> Extension:
    extension = Extension()
    for layer in config.layers(captioner.dims):
        attention = sublayer(captioner.encoder_layers[layer], ATTENTION_NAMES)
        _require(attention, ATTENTION_PARTS, "gated_attention")
        block = PromptAttention(captioner.dims.vision_hidden, attention.num_heads, config.num_query_tokens, config.gating)
        extension.modules[f"qadapter_{layer}"] = block

        def hook(module, args, kwargs, output, block=block):
            return (output[0] + block(_layer_input(args, kwargs), module),) + tuple(output[1:])

        extension.handles.append(attention.register_forward_hook(hook, with_kwargs=True))
    return extension


def _inject_sequence(config: QAdapterConfig, captioner) -> Extension:
    extension = Extension()
    # Each insertion layer's K outputs leave the tower's forward, which returns only hidden states, through these.
    outputs = []
    for layer in config.layers(captioner.dims):
        block = captioner.encoder_layers[layer]
        emits = Slot[torch.Tensor](f"Q-Adapter's layer {layer} query outputs")
        outputs.append(emits)
        if config.sequence_mode == "vqt":
            _require(block, ("layer_norm1", "self_attn", "layer_norm2", "mlp"), "sequence")
            _require(block.self_attn, ATTENTION_PARTS, "sequence")
            queries = ReadOutQueries(captioner.dims.vision_hidden, config.num_query_tokens)
            extension.handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, queries=queries, emits=emits: emits.put(queries(_layer_input(args, kwargs),
                                                                                            module)),
                with_kwargs=True))
        else:
            queries = SequenceTokens(captioner.dims.vision_hidden, config.num_query_tokens)
            extension.handles.append(block.register_forward_pre_hook(
                lambda _module, args, kwargs, queries=queries: _with_layer_input(args, kwargs, queries.append),
                with_kwargs=True))
            extension.handles.append(after_layer(block, lambda hidden, queries=queries, emits=emits: _split_off(
                hidden, queries, emits)))
        extension.modules[f"qadapter_{layer}"] = queries
    if config.queries_to_lm:
        extension.frame_tokens = lambda _vision: torch.cat([emits.get() for emits in outputs], dim=1)
    return extension


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_layer_input(args: tuple, kwargs: dict, change) -> tuple[tuple, dict]:
    """An encoder layer's call with its hidden states (positional or by name) replaced by ``change(them)``."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
    return (change(args[0]), *args[1:]), kwargs


def _split_off(hidden: torch.Tensor, tokens: SequenceTokens, emits: Slot) -> torch.Tensor:
    patches, own = tokens.split(hidden)
    emits.put(own)
    return patches
