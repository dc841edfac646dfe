"""Model shapes for validating search spaces offline, torch-free: the tiny base's and paper scale's.

Search-space validation must not import torch (tests/study/test_space.py checks it), so the
shapes are written out here from each family's layout; tests/model/test_tiny_shapes.py checks
them against the tiny base ``qstudy base`` builds and against transformers' own CLIP and GPT-2,
so they cannot drift. Used by tests/study, tests/methods and tests/test_yaml_files.py.
"""

from __future__ import annotations

from qstudy.core.dims import ModelDims
from qstudy.data.synthetic import caption_vocabulary


def clip_vision_shapes(hidden: int, intermediate: int, layers: int, image_size: int,
                       patch_size: int) -> dict[str, tuple[int, ...]]:
    """``CLIPVisionModel``'s parameters, as its safetensors header lists them."""
    norm = lambda name: {f"{name}.weight": (hidden,), f"{name}.bias": (hidden,)}  # noqa: E731
    linear = lambda name, out, into: {f"{name}.weight": (out, into), f"{name}.bias": (out,)}  # noqa: E731
    shapes = {"embeddings.class_embedding": (hidden,),
              "embeddings.patch_embedding.weight": (hidden, 3, patch_size, patch_size),
              "embeddings.position_embedding.weight": ((image_size // patch_size) ** 2 + 1, hidden),
              **norm("pre_layrnorm"), **norm("post_layernorm")}
    for layer in range(layers):
        prefix = f"encoder.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= linear(f"{prefix}.self_attn.{proj}", hidden, hidden)
        shapes |= (norm(f"{prefix}.layer_norm1") | norm(f"{prefix}.layer_norm2")
                   | linear(f"{prefix}.mlp.fc1", intermediate, hidden)
                   | linear(f"{prefix}.mlp.fc2", hidden, intermediate))
    return shapes


def gpt2_shapes(vocab: int, positions: int, hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """``GPT2LMHeadModel``'s parameters (the LM head is tied to ``wte``); Conv1D weights are (in, out)."""
    norm = lambda name: {f"{name}.weight": (hidden,), f"{name}.bias": (hidden,)}  # noqa: E731
    conv = lambda name, into, out: {f"{name}.weight": (into, out), f"{name}.bias": (out,)}  # noqa: E731
    shapes = {"transformer.wte.weight": (vocab, hidden), "transformer.wpe.weight": (positions, hidden),
              **norm("transformer.ln_f")}
    for layer in range(layers):
        prefix = f"transformer.h.{layer}"
        shapes |= (norm(f"{prefix}.ln_1") | norm(f"{prefix}.ln_2") | conv(f"{prefix}.attn.c_attn", hidden, 3 * hidden)
                   | conv(f"{prefix}.attn.c_proj", hidden, hidden) | conv(f"{prefix}.mlp.c_fc", hidden, 4 * hidden)
                   | conv(f"{prefix}.mlp.c_proj", 4 * hidden, hidden))
    return shapes


def tiny_dims() -> ModelDims:
    """The tiny base (model/tiny.py, train/pretrain.py's ``BaseSpec``): CLIP-vision 64 wide x 4 layers on 32 px
    frames in 8 px patches, GPT-2 128 wide x 2 layers over the captions' words, 4 frames, a rank-16 merger."""
    vocab = len(set(caption_vocabulary())) + 4  # the word-level tokenizer's words and its four special tokens
    return ModelDims(vision_hidden=64, vision_layers=4, lm_hidden=128, lm_layers=2,
                     num_frames=4, vision_shapes=clip_vision_shapes(64, 128, 4, 32, 8),
                     lm_shapes=gpt2_shapes(vocab, 256, 128, 2), vision_image_size=32, vision_patch_size=8,
                     vision_heads=4, frame_grid=2, temporal_merger_rank=16)


def paper_dims() -> ModelDims:
    """CLIP ViT-B/16 + GPT-2 (124M), 8 frames."""
    return ModelDims(vision_hidden=768, vision_layers=12, lm_hidden=768, lm_layers=12,
                     num_frames=8, vision_shapes=clip_vision_shapes(768, 3072, 12, 224, 16),
                     lm_shapes=gpt2_shapes(50257, 1024, 768, 12), vision_image_size=224, vision_patch_size=16, vision_heads=12)
