"""qstudy, not the installed transformers, decides whether Hub kernels replace a model's layers.

transformers 5.25 (the locked version) loads every model with Hub kernels on unless told
otherwise, and kernelizes again at every ``.train()`` / ``.eval()``. qstudy loads both towers
with them off unless ``model.hub_kernels`` says so.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModel, AutoModelForCausalLM

from qstudy.model.captioner import Captioner

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "qstudy"


def towers(captioner: Captioner) -> dict:
    return {"vision": captioner.vision, "lm": captioner.lm}


def test_the_installed_transformers_turns_hub_kernels_on_by_default(tiny_random_base):
    # What the tests below guard against; if a release turns the default off, they still hold.
    lm = AutoModelForCausalLM.from_pretrained(tiny_random_base.language_model)
    vision = AutoModel.from_pretrained(tiny_random_base.vision_encoder)
    assert lm.use_kernels and vision.use_kernels


@pytest.mark.parametrize("hub_kernels", [False, True])
def test_both_towers_follow_model_hub_kernels_through_train_and_eval(tiny_random_base, hub_kernels):
    captioner = Captioner.from_pretrained(replace(tiny_random_base, hub_kernels=hub_kernels), num_frames=2)
    for mode in ("loaded", "train", "eval"):
        if mode != "loaded":
            getattr(captioner, mode)()
        assert {name: tower.use_kernels for name, tower in towers(captioner).items()} == \
            {"vision": hub_kernels, "lm": hub_kernels}, mode


def _model_loads(tree: ast.AST):
    """Calls ``<Auto model class>.from_pretrained(...)``: tokenizers and processors kernelize nothing."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"
                and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("AutoModel")):
            yield node


def test_every_model_qstudy_loads_goes_through_loading_options():
    # The caption, export and base paths all load through Captioner.from_pretrained; a new load
    # site that forgets the options would bring the Hub kernels back.
    loads = [(path.relative_to(PACKAGE), call) for path in sorted(PACKAGE.rglob("*.py"))
             for call in _model_loads(ast.parse(path.read_text()))]
    assert loads, "no model load found: the scan is broken"
    unguarded = [f"{path}:{call.lineno}" for path, call in loads
                 if not any(kw.arg is None and isinstance(kw.value, ast.Call)
                            and getattr(kw.value.func, "id", None) == "loading_options" for kw in call.keywords)]
    assert not unguarded
