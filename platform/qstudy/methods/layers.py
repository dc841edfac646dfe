"""What several methods' modules share: the gate, the hooks that splice a module into a layer, sublayer lookup.

Method configs stay torch-free (the sampler counts parameters without torch); a method's own
modules are in its ``methods/<name>/modules.py``.
"""

from __future__ import annotations

import torch
from torch import nn


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


def after_layer(layer: nn.Module, module) -> torch.utils.hooks.RemovableHandle:
    """Apply ``module`` (hidden states -> hidden states) to ``layer``'s output hidden states (a tensor, or the first of a tuple)."""

    def hook(_layer, _args, output):
        if isinstance(output, tuple):
            return (module(output[0]),) + output[1:]
        return module(output)

    return layer.register_forward_hook(hook)


# Sublayer names across model families: CLIP/SigLIP/Llama call attention ``self_attn``, GPT-2 ``attn``.
ATTENTION_NAMES = ("self_attn", "attn", "attention")
FEED_FORWARD_NAMES = ("mlp", "feed_forward")


def sublayer(block: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """The child of a transformer block called one of ``names`` (its attention or feed-forward)."""
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(f"{type(block).__name__} has none of the sublayers {names}")


def beside_sublayer(layer: nn.Module, branch) -> torch.utils.hooks.RemovableHandle:
    """Add ``branch(input)`` to ``layer``'s output: a branch parallel to it on the same (normed) input."""

    def hook(_layer, args, output):
        return output + branch(args[0])

    return layer.register_forward_hook(hook)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer that starts at exactly zero: an update that starts the model at its base."""
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear
