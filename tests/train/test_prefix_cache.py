"""The frozen-prefix cache: computed once per key, keyed by what the states depend on, and wired into a run.

Loss and gradient equality with and without reuse, for every method, is in
tests/methods/test_adapter_table.py; this file covers the cache and the recipe around it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from qstudy.methods import adapter_config_from_mapping
from qstudy.methods.inject import apply_adapter
from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.model.captioner import Captioner
from qstudy.train import prefix_cache
from qstudy.train.prefix_cache import prefix_key, prefix_states, reuse_depth
from qstudy.train.recipe import MappedRows, run

FRAMES = 2


@pytest.fixture
def captioner(tiny_random_base) -> Captioner:
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(tiny_random_base, FRAMES)
    apply_adapter(captioner, adapter_config_from_mapping({"method": "qadapter", "insertion_layers": "last:2"}))
    return captioner


def run_config(tmp_path, **adapter) -> RunConfig:
    config = RunConfig.from_yaml(DEMO_CONFIG)
    config.adapter = adapter_config_from_mapping(adapter or {"method": "qadapter", "insertion_layers": "last:2"})
    config.data.cache_dir = str(tmp_path / "cache")
    return config


def test_states_are_computed_once_and_mapped_after(captioner, tmp_path, monkeypatch):
    frames = MappedRows(np.random.default_rng(0).integers(0, 256, (20, FRAMES, 32, 32, 3), dtype=np.uint8))
    config = run_config(tmp_path)
    computed = []
    real = Captioner.vision_prefix
    monkeypatch.setattr(Captioner, "vision_prefix", lambda self, f, d: computed.append(len(f)) or real(self, f, d))

    first, dtype = prefix_states(captioner, frames, "entry", 2, config, progress=False)
    second, _ = prefix_states(captioner, frames, "entry", 2, config, progress=False)

    assert computed == [16, 4]  # every clip once, in fixed chunks; the second call only mapped the entry
    assert isinstance(second, np.memmap) and not second.flags.writeable and np.array_equal(first, second)
    with torch.no_grad():
        expected = real(captioner, frames[:], 2).to(dtype)
    assert torch.equal(MappedRows(second, view=dtype)[:], expected)
    assert not list((tmp_path / "cache" / "prefix").glob("*.partial"))


def test_the_key_covers_the_prefix_weights_frames_depth_and_storage_but_not_what_trains_after(captioner):
    key = prefix_key(captioner, 2, "entry", False, torch.float16)
    assert prefix_key(captioner, 3, "entry", False, torch.float16) != key
    assert prefix_key(captioner, 2, "other entry", False, torch.float16) != key
    assert prefix_key(captioner, 2, "entry", True, torch.float16) != key  # blind frames are zeros
    assert prefix_key(captioner, 2, "entry", False, torch.bfloat16) != key
    with torch.no_grad():
        captioner.encoder_layers[2].mlp.fc1.weight.add_(1)  # after the prefix: trials differing there share it
        captioner.adapter_modules["qadapter_2"].down.weight.add_(1)
    assert prefix_key(captioner, 2, "entry", False, torch.float16) == key
    with torch.no_grad():
        captioner.encoder_layers[1].mlp.fc1.weight[0, 0] += 1e-3
    assert prefix_key(captioner, 2, "entry", False, torch.float16) != key


def test_a_method_that_touches_the_layers_it_declares_frozen_is_refused(captioner, tmp_path):
    config = run_config(tmp_path)
    assert reuse_depth(captioner, config)[0] == 2
    captioner.encoder_layers[1].mlp.register_forward_hook(lambda *_: None)
    with pytest.raises(RuntimeError, match="declares 2 frozen vision layers, but CLIPMLP 'mlp' in them has a hook"):
        reuse_depth(captioner, config)
    config.data.reuse_frozen_prefix = False
    assert reuse_depth(captioner, config) == (0, "off (data.reuse_frozen_prefix: false)")


@pytest.mark.parametrize(("method", "reused"), [("frozen", True), ("qadapter", False)],
                         ids=["frozen", "qadapter-all-layers"])
def test_a_run_reuses_the_prefix_where_it_applies_and_says_so_where_not(tiny_workspace, tmp_path, caplog, method,
                                                                        reused, monkeypatch):
    config = RunConfig.from_yaml(DEMO_CONFIG)  # Q-Adapter in every encoder layer
    if method != config.adapter.method:
        config.adapter = adapter_config_from_mapping({"method": method})
    config.train = replace(config.train, epochs=2, max_steps_per_epoch=3)
    config.data.max_val_clips, config.eval.meteor, config.eval.max_new_tokens = 6, False, 4
    config.data.cache_dir = str(tmp_path / "cache")
    config.output_dir = str(tmp_path / "run")
    built = []
    real = prefix_cache._write_states
    monkeypatch.setattr(prefix_cache, "_write_states", lambda *args: built.append(len(args[2])) or real(*args))

    with caplog.at_level(logging.INFO, logger="qstudy.train.recipe"):
        first = run(config, progress=False)
        second = run(config, progress=False)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("frozen-prefix reuse")]
    assert len(lines) == 2 and all(np.isfinite(e.train_loss) for e in first.epochs + second.epochs)
    if reused:
        assert lines[0] == "frozen-prefix reuse: frozen leaves layers 0..3 of 4 frozen: their states are computed once per clip"
        assert built == [336, 6]  # train and val clips, once: the second run mapped both
        assert [e.val for e in first.epochs] == [e.val for e in second.epochs]
    else:
        assert lines[0] == ("frozen-prefix reuse: not applicable: qadapter trains or hooks the vision encoder "
                            "from its first layer")
        assert built == [] and not (tmp_path / "cache" / "prefix").exists()
