"""Model shapes for validating search spaces offline: the tiny preset by hand, paper scale from config classes.

Used by tests/study/test_space.py and the repository-wide YAML test (tests/test_yaml_files.py).
"""

from __future__ import annotations

from qstudy.core.dims import ModelDims


def tiny_dims() -> ModelDims:
    """The tiny preset's shapes: CLIP-vision (64 wide, 4 layers), GPT-2 (128 wide, 2 layers), a rank-16 merger."""
    vision = {"embeddings.patch_embedding.weight": (64, 3, 8, 8), "post_layernorm.weight": (64,)}
    for layer in range(4):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            vision[f"encoder.layers.{layer}.self_attn.{proj}.weight"] = (64, 64)
        vision[f"encoder.layers.{layer}.mlp.fc1.weight"] = (128, 64)
        vision[f"encoder.layers.{layer}.mlp.fc2.weight"] = (64, 128)
    lm = {"transformer.wte.weight": (33, 128)}
    for layer in range(2):
        lm[f"transformer.h.{layer}.attn.c_attn.weight"] = (128, 384)
        lm[f"transformer.h.{layer}.attn.c_proj.weight"] = (128, 128)
        lm[f"transformer.h.{layer}.mlp.c_fc.weight"] = (128, 512)
    return ModelDims(vision_hidden=64, vision_layers=4, lm_hidden=128, lm_layers=2,
                     num_frames=8, vision_shapes=vision, lm_shapes=lm, vision_image_size=32, vision_patch_size=8,
                     temporal_merger_rank=16)


def paper_dims() -> ModelDims:
    """CLIP ViT-B/16 + GPT-2 (124M) shapes from their config classes: no download, no weights."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        vision = CLIPVisionModel(CLIPVisionConfig(patch_size=16, image_size=224))
        lm = GPT2LMHeadModel(GPT2Config())
    shapes = lambda model: {name: tuple(p.shape) for name, p in model.named_parameters()}  # noqa: E731
    return ModelDims(vision_hidden=768, vision_layers=12, lm_hidden=768, lm_layers=12,
                     num_frames=8, vision_shapes=shapes(vision), lm_shapes=shapes(lm), vision_image_size=224,
                     vision_patch_size=16)
