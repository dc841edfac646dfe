"""LoRA's modules: peft's LoRA layers injected in place of the targeted linear layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qstudy.methods.lora.config import LoraConfig
from qstudy.model.extension import Extension

if TYPE_CHECKING:
    import peft


class LoraLayers:
    """The handle of one tower's LoRA layers: ``remove`` puts the base layers back (peft's unload, unmerged)."""

    def __init__(self, tuner: peft.LoraModel):
        self.tuner = tuner

    def remove(self) -> None:
        self.tuner.unload()


def inject(config: LoraConfig, captioner) -> Extension:
    # peft takes ~2 s to import: only runs of this method pay for it, not every process that trains.
    import peft

    extension = Extension()
    for tower, _, modules in config.targets(captioner.dims):
        model = getattr(captioner, tower)
        present = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=[m for m in modules if m in present])
        # What peft.inject_adapter_in_model does, keeping the tuner that can unload it.
        extension.handles.append(LoraLayers(peft.LoraModel(model, lora, adapter_name="default")))
    return extension
