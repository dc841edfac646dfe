"""LoRA's modules: peft's LoRA layers injected in place of the targeted linear layers."""

from __future__ import annotations

import peft

from qstudy.methods.lora.config import LoraConfig


def inject(config: LoraConfig, captioner) -> None:
    for tower, _, modules in config.targets(captioner.dims):
        model = getattr(captioner, tower)
        present = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=[m for m in modules if m in present])
        peft.inject_adapter_in_model(lora, model)
