"""What several methods' modules share: the hook that splices a module after a layer, sublayer lookup, zero-init linears.

Method configs stay torch-free (the sampler counts parameters without torch); a method's own
modules are in its ``methods/<name>/modules.py``.
"""

from __future__ import annotations

import torch
from torch import nn


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


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer that starts at exactly zero: an update that starts the model at its base."""
    linear = nn.Linear(in_features, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear
