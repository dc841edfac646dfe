"""The captioner's memory knob: activation checkpointing changes what is kept, not what is computed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qstudy.methods import ADAPTERS
from qstudy.methods.inject import apply_adapter
from qstudy.model.captioner import Captioner

NUM_FRAMES = 2
CAPTIONS = ["a red circle moves left", "a blue square moves up"]


def loss_and_grads(base, method: str, checkpointing: bool) -> tuple[torch.Tensor, dict, dict]:
    """One training forward and backward; also how often the last vision layer's and LM block's MLPs ran."""
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(replace(base, gradient_checkpointing=checkpointing), NUM_FRAMES)
    apply_adapter(captioner, ADAPTERS[method]())
    calls = {"vision": 0, "lm": 0}
    for tower, layer in (("vision", captioner.encoder_layers[-1]), ("lm", captioner.lm_blocks[-1])):
        # Inside the layer (HF keeps the layer's own hooks outside what it recomputes) and before
        # its MLP runs (the recompute stops once it has rebuilt the last tensor the backward needs).
        layer.mlp.register_forward_pre_hook(lambda *_, tower=tower: calls.update({tower: calls[tower] + 1}))
    # Whether the backward goes through the vision tower at all (through adapters inside it).
    captioner.encoder_layers[-1].register_forward_hook(lambda _, __, out: calls.update(vision_grad=out.requires_grad))
    size = captioner.image_size
    frames = torch.randint(0, 256, (2, NUM_FRAMES, size, size, 3), dtype=torch.uint8)
    captioner.train()
    torch.manual_seed(1)  # the same dropout masks in both runs
    loss = captioner(frames, *captioner.tokenize(CAPTIONS))
    loss.backward()
    grads = {name: p.grad for name, p in captioner.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_checkpointing_recomputes_layers_and_gives_the_same_loss_and_gradients(tiny_random_base, method):
    loss, grads, calls = loss_and_grads(tiny_random_base, method, checkpointing=False)
    checkpointed_loss, checkpointed_grads, checkpointed_calls = loss_and_grads(tiny_random_base, method, True)
    # A layer is run again in the backward when gradients flow through it: the LM's always (the
    # projector trains), the vision tower's when the method trains something in it.
    vision_grad = calls.pop("vision_grad")
    assert calls == {"vision": 1, "lm": 1}
    assert checkpointed_calls == {"vision": 1 + vision_grad, "lm": 2, "vision_grad": vision_grad}
    torch.testing.assert_close(checkpointed_loss, loss)
    assert grads.keys() == checkpointed_grads.keys()
    assert all(grad is not None for grad in checkpointed_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)
