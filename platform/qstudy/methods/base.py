"""The method contract: the base of every method's config, a dataclass with closed-form parameter counts.

A method is one folder, ``methods/<name>/``: ``config.py`` subclasses :class:`AdapterConfig`
(torch-free: the sampler and the parameter budget count a config's parameters before anything
is built), and ``modules.py`` holds its torch modules and an ``inject(config, captioner)`` that
hooks them in and returns what it added, an ``Extension`` the captioner keeps by name and can
remove (``model/extension.py``). ``methods/registry.py`` names each config, ``methods/inject.py``
each ``inject``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from qstudy.core.dims import ModelDims
from qstudy.core.validate import field_mapping

TowerTarget = Literal["vision", "lm", "both"]  # the towers a method that may adapt either (or both) adapts


def targeted_towers(target: TowerTarget) -> tuple[str, ...]:
    """The towers ``target`` names, vision first: ``"both"`` is ``("vision", "lm")``."""
    return ("vision", "lm") if target == "both" else (target,)


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses add their hyperparameters as fields."""

    method: ClassVar[str]
    # Fields another field's value may leave unused (see ``uses``); a search samples them after
    # the others, and only where used, so the sampler sees them as conditional.
    conditional_fields: ClassVar[frozenset[str]] = frozenset()

    @property
    def starts_at_base(self) -> bool:
        """Whether the adapted model's output equals the base's before any step (zero-initialised updates)."""
        return False

    def uses(self, name: str) -> bool:
        """Whether field ``name`` changes what this config builds, given its other fields."""
        return True

    def to_mapping(self) -> dict[str, Any]:
        """The mapping ``registry.adapter_config_from_mapping`` reads back: ``method`` first, then the fields."""
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
