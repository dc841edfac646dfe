"""tests/shapes.py's shapes are the real models': the tiny base ``qstudy base`` builds, transformers' CLIP, GPT-2."""

from __future__ import annotations

import torch
from shapes import paper_dims, tiny_dims
from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.model.captioner import Captioner


def test_tiny_dims_are_the_preset_models(tiny_workspace):
    config = RunConfig.from_yaml(DEMO_CONFIG)  # names the workspace's cached base
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    dims = tiny_dims()
    assert captioner.dims == dims
    assert dims.total_params == sum(parameter.numel() for parameter in captioner.parameters())


def test_paper_dims_are_transformers_models():
    with torch.device("meta"):  # shapes only: no weights, no download
        vision = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224))
        lm = GPT2LMHeadModel(GPT2Config())
    shapes = lambda model: {name: tuple(p.shape) for name, p in model.named_parameters()}  # noqa: E731
    dims = paper_dims()
    assert (dims.vision_shapes, dims.lm_shapes) == (shapes(vision), shapes(lm))
    assert (dims.vision_hidden, dims.vision_layers) == (768, 12)
    assert (dims.lm_hidden, dims.lm_layers) == (768, 12)
