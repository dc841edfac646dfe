"""The adapter contract: a dataclass config per method, a name registry, and parameter counts.

A method subclasses :class:`AdapterConfig`, decorates it with :func:`register`, and
implements ``extra_trainable`` (closed form, torch-free: the sampler and the parameter budget
use it before anything is built) and ``inject`` (adds its modules to a captioner, which is
already frozen except for its projector). :func:`apply_adapter` is the one entry point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from qstudy.config import ConfigError, from_mapping
from qstudy.model.dims import ModelDims

if TYPE_CHECKING:
    import torch

    from qstudy.model.captioner import Captioner

ADAPTERS: dict[str, type["AdapterConfig"]] = {}


def register(cls: type["AdapterConfig"]) -> type["AdapterConfig"]:
    """Class decorator: make a config reachable by its ``method`` name."""
    if cls.method in ADAPTERS:
        raise ValueError(f"adapter method {cls.method!r} registered twice")
    ADAPTERS[cls.method] = cls
    return cls


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses add their hyperparameters as fields."""

    method: ClassVar[str]
    # Zero-initialised methods start exactly at the base model; the test table checks it.
    starts_at_base: ClassVar[bool] = False

    def validate(self, dims: ModelDims) -> None:
        """Check the hyperparameters against the model's shapes; raise ConfigError naming the field."""

    def extra_trainable(self, dims: ModelDims) -> int:
        """Closed-form count of the parameters this method trains besides the projector."""
        raise NotImplementedError

    def inject(self, captioner: "Captioner") -> None:
        """Add the method's modules to ``captioner`` (frozen except its projector)."""
        raise NotImplementedError

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        """Leading vision encoder layers (embeddings included) this method leaves frozen and unhooked.

        Their outputs depend on the clip alone, so a run may compute them once per clip and reuse
        them (train/prefix_cache.py); ``dims.vision_layers`` when the whole tower is untouched.
        0, the default, makes a method run the whole encoder every step until it says otherwise.
        """
        return 0

    def count_trainable(self, dims: ModelDims) -> int:
        return dims.projector_params + self.extra_trainable(dims)

    def hyperparameters(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def adapter_config_from_mapping(data: Any, where: str = "adapter") -> AdapterConfig:
    """Pick the registered config class by ``method`` and validate the remaining keys."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"missing key {where}.method (one of: {', '.join(sorted(ADAPTERS))})")
    fields = dict(data)
    method = fields.pop("method")
    if method not in ADAPTERS:
        raise ConfigError(f"{where}.method: unknown method {method!r} (one of: {', '.join(sorted(ADAPTERS))})")
    return from_mapping(ADAPTERS[method], fields, where)


def apply_adapter(captioner: "Captioner", config: AdapterConfig) -> list["torch.nn.Parameter"]:
    """Freeze the base, keep the projector trainable, inject the method; return what trains."""
    config.validate(captioner.dims)
    captioner.requires_grad_(False)
    captioner.projector.requires_grad_(True)
    if captioner.projector.temporal_merger is not None:
        # The merger is the vision side's pretrained motion reader (Qwen2-VL keeps its merger in
        # the vision tower): it stays frozen with the tower, and adapting what it reads is the
        # methods' job.
        captioner.projector.temporal_merger.requires_grad_(False)
    config.inject(captioner)
    return [parameter for parameter in captioner.parameters() if parameter.requires_grad]


def count_parameters(module: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    for parameter in module.parameters():  # parameters() already yields each tensor once
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total
