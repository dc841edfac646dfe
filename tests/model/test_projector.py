"""The projector: per-frame tokens to the LM's width, and the optional clip token merged from all frames."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qstudy.cli import DEMO_CONFIG
from qstudy.core.errors import ConfigError
from qstudy.config import ModelConfig, RunConfig
from qstudy.model.captioner import Captioner, Projector
from qstudy.core.dims import ModelDims


def dims(frame_grid: int, temporal_merger_rank: int) -> ModelDims:
    return ModelDims(vision_hidden=12, vision_layers=2, lm_hidden=10, lm_layers=2,
                     num_frames=3, vision_shapes={}, lm_shapes={}, frame_grid=frame_grid,
                     temporal_merger_rank=temporal_merger_rank)


@pytest.mark.parametrize("frame_grid", [0, 2])
@pytest.mark.parametrize("temporal_merger_rank", [0, 4])
def test_closed_form_count_matches_the_module(frame_grid, temporal_merger_rank):
    shapes = dims(frame_grid, temporal_merger_rank)
    projector = Projector(shapes)
    merger = projector.temporal_merger
    assert (sum(p.numel() for p in merger.parameters()) if merger else 0) == shapes.temporal_merger_params
    assert sum(p.numel() for p in projector.parameters()) == shapes.projector_params + shapes.temporal_merger_params


def test_clip_token_reads_every_frame_but_not_the_tokens_adapters_append():
    shapes = dims(frame_grid=2, temporal_merger_rank=4)
    projector = Projector(shapes)
    base_tokens = torch.randn(2, shapes.num_frames, shapes.base_tokens_per_frame, shapes.vision_hidden)
    with_queries = torch.cat([base_tokens, torch.randn(2, shapes.num_frames, 3, shapes.vision_hidden)], dim=2)
    clip_token = projector.clip_token(base_tokens)
    assert clip_token.shape == (2, 1, shapes.lm_hidden)
    torch.testing.assert_close(projector.clip_token(with_queries), clip_token, rtol=0, atol=0)
    # Swapping two frames changes it: order (motion) is what the merger is for.
    assert not torch.allclose(projector.clip_token(base_tokens[:, [1, 0, 2]]), clip_token)


def test_a_projector_loaded_with_another_merger_rank_names_the_field(tiny_workspace):
    preset = RunConfig.from_yaml(DEMO_CONFIG)
    assert preset.model.temporal_merger_rank > 0  # the tiny base is trained with a merger
    with pytest.raises(ConfigError, match="model.temporal_merger_rank"):
        Captioner.from_pretrained(replace(preset.model, temporal_merger_rank=0), preset.data.num_frames)


def test_negative_merger_rank_is_rejected():
    with pytest.raises(ConfigError, match="model.temporal_merger_rank must be >= 0"):
        ModelConfig(vision_encoder="v", language_model="l", temporal_merger_rank=-1)
