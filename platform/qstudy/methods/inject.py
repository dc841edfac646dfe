"""Putting a method on a captioner: freeze the base, run the method's ``modules.inject``, keep what it added, say what trains."""

from __future__ import annotations

import importlib

import torch

from qstudy.methods.registry import AdapterConfig


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
    # The modules sit beside the config, in methods/<name>/modules.py; they load only here.
    package = type(config).__module__.rpartition(".")[0]
    captioner.add_adapter(config.method, importlib.import_module(f"{package}.modules").inject(config, captioner))
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
