"""Putting a method on a captioner: freeze the base, run the method's ``inject``, keep what it added, say what trains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from qstudy.methods.ademvl import modules as ademvl
from qstudy.methods.bottleneck import modules as bottleneck
from qstudy.methods.compacter import modules as compacter
from qstudy.methods.frozen import modules as frozen
from qstudy.methods.full import modules as full
from qstudy.methods.hyperformer import modules as hyperformer
from qstudy.methods.lora import modules as lora
from qstudy.methods.prompt_tuning import modules as prompt_tuning
from qstudy.methods.qadapter import modules as qadapter
from qstudy.methods.base import AdapterConfig
from qstudy.model.extension import Extension

# (config, captioner) -> what the method added to the captioner
Inject = Callable[[Any, Any], Extension]

# Every method's inject by name, one line a method, as peft maps its method names to their
# tuners; ``methods/registry.py`` maps the same names to their configs.
INJECTS: dict[str, Inject] = {
    "qadapter": qadapter.inject,
    "full": full.inject,
    "frozen": frozen.inject,
    "lora": lora.inject,
    "bottleneck": bottleneck.inject,
    "compacter": compacter.inject,
    "hyperformer": hyperformer.inject,
    "prompt_tuning": prompt_tuning.inject,
    "ademvl": ademvl.inject,
}


def apply_adapter(captioner, config: AdapterConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, keep the projector trainable, inject the method; return what trains.

    The captioner keeps what the method added under its name: ``captioner.remove_adapter(config.method)``
    gives back the base's behaviour (not its ``requires_grad`` flags).
    """
    config.validate(captioner.dims)
    captioner.requires_grad_(False)
    captioner.projector.requires_grad_(True)
    if captioner.projector.temporal_merger is not None:
        # The merger is the vision side's pretrained motion reader (Qwen2-VL keeps its merger in
        # the vision tower): it stays frozen with the tower, and adapting what it reads is the
        # methods' job.
        captioner.projector.temporal_merger.requires_grad_(False)
    captioner.add_adapter(config.method, INJECTS[config.method](config, captioner))
    return [parameter for parameter in captioner.parameters() if parameter.requires_grad]


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once.

    A parameter ZeRO-3 has partitioned holds none of its elements here (``numel()`` is 0);
    DeepSpeed keeps its whole count in ``ds_numel``.
    """
    trainable = total = 0
    for parameter in module.parameters():  # parameters() already yields each tensor once
        count = getattr(parameter, "ds_numel", parameter.numel())
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
