"""The method contract: a dataclass config per method, registered by name, with closed-form parameter counts.

A method is one folder, ``methods/<name>/``: ``config.py`` subclasses :class:`AdapterConfig`
and decorates it with :func:`register` (torch-free: the sampler and the parameter budget
count a config's parameters before anything is built), and ``modules.py`` holds its torch
modules and an ``inject(config, captioner)`` that hooks them in and returns what it added, an
``Extension`` the captioner keeps by name and can remove (``methods/inject.py``, ``model/extension.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from qstudy.core.dims import ModelDims
from qstudy.core.errors import ConfigError
from qstudy.core.validate import field_mapping, from_mapping

ADAPTERS: dict[str, type["AdapterConfig"]] = {}

TowerTarget = Literal["vision", "lm", "both"]  # the towers a method that may adapt either (or both) adapts


def targeted_towers(target: TowerTarget) -> tuple[str, ...]:
    """The towers ``target`` names, vision first: ``"both"`` is ``("vision", "lm")``."""
    return ("vision", "lm") if target == "both" else (target,)


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

    @property
    def starts_at_base(self) -> bool:
        """Whether the adapted model's output equals the base's before any step (zero-initialised updates)."""
        return False

    @classmethod
    def from_mapping(cls, data: Any, where: str = "adapter") -> "AdapterConfig":
        """Pick the registered config class by ``method`` and validate the remaining keys."""
        if not isinstance(data, dict) or "method" not in data:
            raise ConfigError(f"missing key {where}.method (one of: {', '.join(sorted(ADAPTERS))})")
        fields = dict(data)
        method = fields.pop("method")
        if method not in ADAPTERS:
            raise ConfigError(f"{where}.method: unknown method {method!r} (one of: {', '.join(sorted(ADAPTERS))})")
        return from_mapping(ADAPTERS[method], fields, where)

    def to_mapping(self) -> dict[str, Any]:
        """The mapping :meth:`from_mapping` reads back: ``method`` first, then the fields."""
        return {"method": self.method, **field_mapping(self)}

    def validate(self, dims: ModelDims) -> None:
        """Check the hyperparameters against the model's shapes; raise ConfigError naming the field."""

    def extra_trainable(self, dims: ModelDims) -> int:
        """Closed-form count of the parameters this method trains besides the projector."""
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


def adapter_config_from_mapping(data: Any, where: str = "adapter") -> AdapterConfig:
    """An adapter config from its mapping (``method`` plus that method's fields)."""
    return AdapterConfig.from_mapping(data, where)
