"""``resolve_layers``: Q-Adapter's insertion-layer specs to layer indices, and the errors that name the field."""

from __future__ import annotations

import re

import pytest

from qstudy.core.errors import ConfigError
from qstudy.methods.qadapter.config import resolve_layers

LAYERS = 4  # the tiny vision tower's depth


@pytest.mark.parametrize(("spec", "expected"), [
    ("all", [0, 1, 2, 3]),
    ("last:1", [3]),
    ("last:2", [2, 3]),
    ("last:4", [0, 1, 2, 3]),
    ("every:1", [0, 1, 2, 3]),
    ("every:2", [1, 3]),
    ("every:3", [2]),
    ("every:4", [3]),
    ([2], [2]),
    ([3, 0, 1], [0, 1, 3]),  # sorted
    ([1, 3, 1, 3], [1, 3]),  # duplicates once
], ids=str)
def test_specs_select_these_layers(spec, expected):
    assert resolve_layers(spec, LAYERS) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("last:0", "'last:0' needs a positive count"),
    ("every:0", "'every:0' needs a positive count"),
    ("last:5", "'last:5' asks for more layers than the encoder's 4"),
    ("every:5", "selects no layer"),
    ([], "selects no layer"),
    ([4], "layer 4 is beyond the encoder's 4 layers"),
    ([0, -1], "layer -1 is beyond the encoder's 4 layers"),
    ("last:-1", "'last:-1' is not a list of layers"),
    ("last:", "'last:' is not a list of layers"),
    ("first:2", "'first:2' is not a list of layers"),
    ("ALL", "'ALL' is not a list of layers"),
], ids=str)
def test_bad_specs_fail_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=r"^adapter\.insertion_layers: .*" + re.escape(message)):
        resolve_layers(spec, LAYERS)

