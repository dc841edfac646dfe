"""How the captioner reads each vision tower family: its pooled token first, then the patch grid without any CLS token."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from qstudy.model.captioner import Captioner

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "image_size": 32, "patch_size": 8}
GRID = 4
# name: (tower, the pooled token it should give from its own output)
TOWERS = {
    "clip": (lambda: CLIPVisionModel(CLIPVisionConfig(**SHAPE)),
             lambda tower, hidden: tower.post_layernorm(hidden[:, 0])),
    "siglip": (lambda: SiglipVisionModel(SiglipVisionConfig(**SHAPE)),
               lambda tower, hidden: tower.head(hidden)),
    "siglip-headless": (lambda: SiglipVisionModel(SiglipVisionConfig(**SHAPE, vision_use_head=False)),
                        lambda tower, hidden: hidden.mean(dim=1)),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_pooled_token_then_patch_grid(name, tiny_random_base, tmp_path):
    make_tower, expected_pooled = TOWERS[name]
    torch.manual_seed(0)
    make_tower().save_pretrained(tmp_path / "vision")
    captioner = Captioner.from_pretrained(replace(tiny_random_base, vision_encoder=str(tmp_path / "vision")),
                                          num_frames=2).eval()
    frames = torch.randint(0, 256, (1, 2, 32, 32, 3), dtype=torch.uint8)

    with torch.no_grad():
        tokens = captioner.visual_tokens(frames)
        pixels = ((frames.flatten(0, 1).permute(0, 3, 1, 2).float() / 255 - captioner.pixel_mean) / captioner.pixel_std)
        hidden = captioner.vision(pixel_values=pixels).last_hidden_state
        patches = hidden[:, -GRID * GRID:].transpose(1, 2).unflatten(2, (GRID, GRID))
        grid = F.adaptive_avg_pool2d(patches, captioner.dims.frame_grid).flatten(2).transpose(1, 2)

    assert hidden.shape[1] == GRID * GRID + (name == "clip")  # only CLIP has a CLS token
    torch.testing.assert_close(tokens[0, :, 0], expected_pooled(captioner.vision, hidden))
    torch.testing.assert_close(tokens[0, :, 1:], grid)
