"""Exported weights that do not fit their config.yaml fail to load with a ``WeightsMismatch`` saying how."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.train.reload import WeightsMismatch, load_trained
from qstudy.methods import adapter_config_from_mapping
from qstudy.methods.inject import apply_adapter
from qstudy.model.captioner import Captioner
from qstudy.train.engine import trainable_state


@pytest.fixture(scope="module")
def exported(tiny_workspace, tmp_path_factory) -> tuple[RunConfig, Path]:
    """The tiny preset's Q-Adapter config and its trainable weights, as a run writes them to adapter.safetensors."""
    config = RunConfig.from_yaml(DEMO_CONFIG)
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    apply_adapter(captioner, config.adapter)
    path = tmp_path_factory.mktemp("export") / "adapter.safetensors"
    save_file(trainable_state(captioner), path)
    return config, path


def other_rank(config: RunConfig, path: Path) -> tuple[RunConfig, Path]:
    return replace(config, adapter=replace(config.adapter, rank=config.adapter.rank // 2)), path


def other_method(config: RunConfig, path: Path) -> tuple[RunConfig, Path]:
    return replace(config, adapter=adapter_config_from_mapping({"method": "lora"})), path


def other_placement(config: RunConfig, path: Path) -> tuple[RunConfig, Path]:
    return replace(config, adapter=replace(config.adapter, placement="gated_attention", gating="per_head")), path


def garbage(config: RunConfig, path: Path) -> tuple[RunConfig, Path]:
    broken = path.with_name("garbage.safetensors")
    broken.write_bytes(b"not safetensors")
    return config, broken


def truncated(config: RunConfig, path: Path) -> tuple[RunConfig, Path]:
    broken = path.with_name("truncated.safetensors")
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return config, broken


def test_matching_weights_load_exactly(exported):
    config, path = exported
    loaded, saved = trainable_state(load_trained(config, path)), load_file(path)
    assert loaded.keys() == saved.keys() and all(torch.equal(saved[name], loaded[name]) for name in saved)


def test_a_gated_attention_export_written_as_yaml_reloads_exactly(tiny_workspace, tmp_path):
    raw = RunConfig.from_yaml(DEMO_CONFIG).to_dict()
    raw["adapter"] = {"method": "qadapter", "placement": "gated_attention", "gating": "per_head"}
    config = RunConfig.from_dict(RunConfig.from_dict(raw).to_dict())  # what config.yaml gives back
    assert (config.adapter.placement, config.adapter.gating) == ("gated_attention", "per_head")
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    apply_adapter(captioner, config.adapter)
    with torch.no_grad():  # off the zero-init gates, so that the prompts count
        for parameter in captioner.adapter_modules.parameters():
            parameter.add_(torch.randn_like(parameter))
    save_file(trainable_state(captioner), tmp_path / "adapter.safetensors")
    loaded = load_trained(config, tmp_path / "adapter.safetensors")
    frames = torch.randint(0, 256, (2, config.data.num_frames, captioner.image_size, captioner.image_size, 3),
                           dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.encode_frames(frames), captioner.eval().encode_frames(frames))
        assert not torch.equal(loaded.encode_frames(frames), Captioner.from_pretrained(
            config.model, config.data.num_frames).eval().encode_frames(frames))


@pytest.mark.parametrize(("mismatch", "message"), [
    (other_rank, r"does not fit its config\.yaml: \S+ is \(16,.*\) in the file, \(8,.*\) in the model"),
    (other_method, r"does not fit lora: missing \[.*lora.*\], unexpected \[.*"),
    (other_placement, r"does not fit qadapter: missing \[.*prompts.*\], unexpected \[.*down.*"),
    (garbage, r"garbage\.safetensors: not a readable safetensors file"),
    (truncated, r"truncated\.safetensors: not a readable safetensors file"),
], ids=lambda case: getattr(case, "__name__", ""))
def test_weights_that_do_not_fit_their_config_fail_saying_how(exported, mismatch, message):
    config, path = mismatch(*exported)
    with pytest.raises(WeightsMismatch, match=message):
        load_trained(config, path)
