"""``train.precision: bf16`` trains and saves bf16 weights on CPU; beam search captions each clip on its own rows."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.methods import adapter_config_from_mapping
from qstudy.methods.inject import apply_adapter
from qstudy.model.captioner import Captioner
from qstudy.train.recipe import load_split, run


def smoke_config(tmp_path, **train) -> RunConfig:
    """The tiny preset cut to two steps and four val clips."""
    raw = RunConfig.from_yaml(DEMO_CONFIG).to_dict()
    raw["train"].update({"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 4, **train})
    raw["data"]["max_val_clips"] = 4
    raw["eval"].update({"meteor": False, "max_new_tokens": 8})
    raw["output_dir"] = str(tmp_path / "run")
    return RunConfig.from_dict(raw)


def test_bf16_run_trains_and_saves_bf16_weights(tiny_workspace, tmp_path):
    config = smoke_config(tmp_path, precision="bf16")
    result = run(config, progress=False)
    assert math.isfinite(result.epochs[0].train_loss) and set(result.final) >= {"cider", "bleu4"}
    weights = load_file(tmp_path / "run" / "adapter.safetensors")
    assert weights and {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert sum(tensor.numel() for tensor in weights.values()) == result.trainable_params
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["train"]["precision"] == "bf16"


@pytest.mark.parametrize("adapter", [
    {"method": "frozen"},
    {"method": "qadapter"},  # each placement and gate: tests/methods/test_adapter_table.py, on all four backbone pairs
    {"method": "ademvl", "scale": 1.0, "visual_scale": 1.0},  # per-clip visual state in the LM, loud enough to steer
], ids=lambda adapter: "-".join(str(adapter[key]) for key in ("method", "placement", "sequence_mode") if key in adapter))
def test_beam_search_captions_each_clip_as_it_would_alone(tiny_workspace, tmp_path, adapter):
    config = smoke_config(tmp_path)
    torch.manual_seed(0)
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    apply_adapter(captioner, adapter_config_from_mapping(adapter))
    for name, parameter in captioner.named_parameters():  # off the zero-init start, where adapters change nothing
        if parameter.requires_grad and not name.startswith("projector."):
            torch.nn.init.normal_(parameter, std=0.05)
    captioner.eval()
    # Source-domain clips, which the base was trained on: it captions them apart.
    source = Path(config.model.projector).parent / "source-data"
    data = replace(config.data, annotations=str(source / "annotations.json"), video_dir=str(source / "videos"))
    frames = load_split(data, "validate", captioner.image_size, 3, progress=False).frames[:3]
    beams = captioner.generate(frames, max_new_tokens=8, num_beams=3)
    # Whether the clips' captions differ depends on the base, so on the machine that built it: the
    # check is the equality (on this machine's base a row misalignment breaks it).
    assert beams == [captioner.generate(clip[None], max_new_tokens=8, num_beams=3)[0] for clip in frames]
