"""The captioner's extension point: what one adapter adds, as a record the captioner keeps by name and can remove.

An adapter's ``inject`` builds an :class:`Extension`: its modules (registered under
``Captioner.adapter_modules``, so saving what trains stays one state_dict), the handles of
every hook or replacement it made (each undone by ``remove()``), and the callbacks through
which the captioner asks it for what it adds to a forward: extra tokens per frame, a
different visual prefix, a different LM input, and per-clip state for its hooks inside the
LM. The captioner calls the callbacks with that forward's values and passes their results on;
``Captioner.remove_adapter`` removes the handles and the modules, giving back the base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Removable(Protocol):
    """Anything that undoes one change to the base: a torch hook handle, a swapped-in layer."""

    def remove(self) -> None: ...


@dataclass
class VisionOutput:
    """One vision pass over a batch of frames (batch * frames first).

    ``hidden_states[i]`` is the input of encoder layer i (i = the number of layers: the last
    layer's output), kept only at the indices some extension reads (``Extension.hidden_states``)
    and None elsewhere.
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor | None, ...]


class Slot(Generic[T]):
    """One value that crosses a forward the caller cannot pass it through (a hook inside an HF model).

    ``put`` replaces it; ``get`` reads it and fails when nothing was put, so a hook never runs on
    a value from no forward at all.
    """

    def __init__(self, what: str):
        self.what = what
        self._value: T | None = None

    def put(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self.what}: read before any forward put it")
        return self._value


@dataclass
class Extension:
    """What one adapter adds to a captioner.

    ``frame_tokens``: a vision pass -> extra tokens per frame (batch * frames, k, vision_hidden),
    appended after the base's. ``prefix``: the projected visual prefix (batch, tokens, lm_hidden)
    -> the one the LM receives. ``lm_inputs``: (inputs_embeds, mask) -> the LM's. ``clip_state``:
    a vision pass -> a tensor per clip (clips first) that hooks inside the LM read; the captioner
    selects each LM row's clip (several captions per clip, several beams per clip) and hands the
    rows to ``condition`` before the LM runs. ``hidden_states``: the vision hidden-state indices
    (negative from the end) the callbacks read.
    """

    modules: dict[str, nn.Module] = field(default_factory=dict)
    handles: list[Removable] = field(default_factory=list)
    hidden_states: tuple[int, ...] = ()
    frame_tokens: Callable[[VisionOutput], torch.Tensor] | None = None
    prefix: Callable[[torch.Tensor], torch.Tensor] | None = None
    lm_inputs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    clip_state: Callable[[VisionOutput], torch.Tensor] | None = None
    condition: Callable[[torch.Tensor], None] | None = None

    def __post_init__(self):
        if (self.clip_state is None) != (self.condition is None):
            raise ValueError("an extension's clip_state and condition come together")
