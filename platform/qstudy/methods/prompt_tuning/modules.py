"""Prompt tuning's modules: learned prompt embeddings placed before the LM's input."""

from __future__ import annotations

from qstudy.methods.layers import PromptEncoder
from qstudy.methods.prompt_tuning.config import PromptTuningConfig
from qstudy.model.extension import Extension


def inject(config: PromptTuningConfig, captioner) -> Extension:
    embedding_std = captioner.lm.get_input_embeddings().weight.std().item()
    prompts = PromptEncoder(config.prompt_length, captioner.dims.lm_hidden, config.mid_dim, embedding_std)
    return Extension(modules={"prompt_tuning": prompts}, lm_inputs=prompts)
