"""The extension point: adapters read the tower's hidden states by one index convention, whole tower or reused prefix."""

from __future__ import annotations

import pytest
import torch

from qstudy.model.captioner import Captioner
from qstudy.model.extension import Extension, Slot

NUM_FRAMES = 2


def reader(index: int) -> Extension:
    """An adapter that hands the LM side the vision hidden state at ``index`` and adds nothing else."""
    return Extension(hidden_states=(index,), clip_state=lambda vision: vision.hidden_states[index],
                     condition=lambda _rows: None)


@pytest.fixture(scope="module")
def captioner_and_frames(tiny_random_base):
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(tiny_random_base, NUM_FRAMES).eval()
    size = captioner.image_size
    frames = torch.randint(0, 256, (2, NUM_FRAMES, size, size, 3), dtype=torch.uint8)
    return captioner, frames


@pytest.mark.parametrize(("depth", "index"), [(None, 2), (None, -1), (1, 2), (1, 1), (2, -1)])
def test_hidden_state_i_is_the_input_of_layer_i_whether_or_not_the_prefix_is_reused(captioner_and_frames, depth, index):
    captioner, frames = captioner_and_frames
    layers = len(captioner.encoder_layers)
    captioner.add_adapter("reader", reader(index))
    try:
        with torch.no_grad():
            expected = captioner.vision_prefix(frames, index % (layers + 1)).flatten(0, 1)
            captioner.prefix_depth = depth
            visual = frames if depth is None else captioner.vision_prefix(frames, depth)
            read = captioner.encode(visual)[1]["reader"]
    finally:
        captioner.prefix_depth = None
        captioner.remove_adapter("reader")
    torch.testing.assert_close(read, expected)


def test_a_hidden_state_inside_the_reused_prefix_is_refused(captioner_and_frames):
    captioner, frames = captioner_and_frames
    captioner.add_adapter("reader", reader(1))
    try:
        with torch.no_grad():
            states = captioner.vision_prefix(frames, 2)
            captioner.prefix_depth = 2
            with pytest.raises(ValueError, match=r"reads vision hidden states \[1\]; the reused prefix ends at 2"):
                captioner.encode(states)
    finally:
        captioner.prefix_depth = None
        captioner.remove_adapter("reader")


def test_a_removed_adapter_no_longer_takes_part(captioner_and_frames):
    captioner, frames = captioner_and_frames
    captioner.add_adapter("reader", reader(1))
    with pytest.raises(ValueError, match="already on this captioner"):
        captioner.add_adapter("reader", reader(2))
    captioner.remove_adapter("reader")
    with torch.no_grad():
        assert captioner.encode(frames)[1] == {}


def test_a_slot_read_before_any_put_fails():
    slot = Slot[torch.Tensor]("features")
    with pytest.raises(RuntimeError, match="features: read before any forward put it"):
        slot.get()
    value = torch.ones(2)
    slot.put(value)
    assert slot.get() is value
