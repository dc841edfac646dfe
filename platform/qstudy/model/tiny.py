"""The ``tiny`` preset: small random CLIP-vision + GPT-2 + a word-level tokenizer, saved in HF format.

Nothing is downloaded: the models come from config classes and the tokenizer is trained
locally with ``tokenizers`` on the synthetic captions' vocabulary. The saved directories
load back through the same ``from_pretrained`` path as hub models do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from qstudy.config import ModelConfig

SPECIAL_TOKENS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus the four special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def build_tiny(directory: str | Path, words: list[str], image_size: int = 32, seed: int = 0) -> ModelConfig:
    """Save a tiny random vision tower and LM (with tokenizer) under ``directory``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        image_size=image_size, patch_size=8,
    ))
    lm = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vision.save_pretrained(directory / "vision")
    lm.save_pretrained(directory / "lm")
    tokenizer.save_pretrained(directory / "lm")
    return ModelConfig(vision_encoder=str(directory / "vision"), language_model=str(directory / "lm"),
                       attn_implementation="eager")
