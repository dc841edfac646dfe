"""Prompt tuning's modules: learned prompt embeddings placed before the LM's input."""

from __future__ import annotations

import torch
from torch import nn

from qstudy.methods.prompt_tuning.config import PromptTuningConfig
from qstudy.model.extension import Extension


class PromptEncoder(nn.Module):
    """Prompt tuning: learnable vectors prepended to the LM's input, optionally through an MLP.

    With ``mid_dim`` the prompts are ``Linear(mid_dim -> hidden)(tanh(Linear(hidden -> mid_dim)(P)))``,
    VL-Adapter's reparametrisation (it steadies training); without, P itself is the prompt.
    """

    def __init__(self, prompt_length: int, hidden: int, mid_dim: int | None, init_std: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(prompt_length, hidden) * init_std)
        self.reparametrisation = (nn.Sequential(nn.Linear(hidden, mid_dim), nn.Tanh(), nn.Linear(mid_dim, hidden))
                                  if mid_dim else None)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.prompts if self.reparametrisation is None else self.reparametrisation(self.prompts)
        prompts = prompts.to(inputs.dtype).expand(inputs.shape[0], -1, -1)
        ones = torch.ones(mask.shape[0], prompts.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat([prompts, inputs], dim=1), torch.cat([ones, mask], dim=1)


def inject(config: PromptTuningConfig, captioner) -> Extension:
    embedding_std = captioner.lm.get_input_embeddings().weight.std().item()
    prompts = PromptEncoder(config.prompt_length, captioner.dims.lm_hidden, config.mid_dim, embedding_std)
    return Extension(modules={"prompt_tuning": prompts}, lm_inputs=prompts)
