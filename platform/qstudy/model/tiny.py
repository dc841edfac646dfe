"""The ``tiny`` preset: small random vision tower + LM + a word-level tokenizer, saved in HF format.

Nothing is downloaded: the models come from config classes and the tokenizer is trained
locally with ``tokenizers`` on the synthetic captions' vocabulary. The saved directories
load back through the same ``from_pretrained`` path as hub models do. CLIP + GPT-2 is the
tiny base's pair; SigLIP and Qwen2 (a Llama-family LM) stand in for the towers users bring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

from qstudy.config import ModelConfig

SPECIAL_TOKENS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}


def _clip(image_size: int):
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, image_size=image_size, patch_size=8))


def _siglip(image_size: int):
    # No CLS token; the pooled token comes from its attention-pool head.
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=image_size, patch_size=8))


def _gpt2(tokenizer):
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=2, n_head=4,
                                      **_special_ids(tokenizer)))


def _qwen2(tokenizer):
    # Grouped-query attention (fewer KV heads) and tied embeddings, as Qwen2-0.5B has.
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True,
                                        **_special_ids(tokenizer)))


def _special_ids(tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


VISION_TOWERS = {"clip": _clip, "siglip": _siglip}
LANGUAGE_MODELS = {"gpt2": _gpt2, "qwen2": _qwen2}


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus the four special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def build_tiny(directory: str | Path, words: list[str], image_size: int = 32, seed: int = 0,
               vision: str = "clip", lm: str = "gpt2") -> ModelConfig:
    """Save a tiny random vision tower and LM (with tokenizer) of the named families under ``directory``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    VISION_TOWERS[vision](image_size).save_pretrained(directory / "vision")
    LANGUAGE_MODELS[lm](tokenizer).save_pretrained(directory / "lm")
    tokenizer.save_pretrained(directory / "lm")
    return ModelConfig(vision_encoder=str(directory / "vision"), language_model=str(directory / "lm"),
                       attn_implementation="eager")
