"""LoRA through ``peft`` on the vision encoder, the language model, or both.

Target modules are matched by name suffix, as peft does; names a model lacks are ignored,
so one default list serves CLIP/SigLIP (q_proj, v_proj), GPT-2 (c_attn) and Llama-style LMs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from qstudy.methods.base import AdapterConfig, TowerTarget, targeted_towers
from qstudy.core.errors import ConfigError
from qstudy.core.dims import ModelDims


def _matching_shapes(shapes: dict[str, tuple[int, ...]], modules: list[str]) -> list[tuple[int, ...]]:
    """Weight shapes of the 2-D weights whose module name ends with one of ``modules``."""
    matched = []
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and module.rpartition(".")[2] in modules:
            matched.append(shape)
    return matched


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA rank/alpha/dropout and where it goes."""

    method = "lora"

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: TowerTarget = "both"
    vision_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lm_modules: list[str] = field(default_factory=lambda: ["c_attn", "q_proj", "v_proj"])

    @property
    def starts_at_base(self) -> bool:  # peft zero-initialises B
        return True

    def targets(self, dims: ModelDims) -> list[tuple[str, dict, list[str]]]:
        """(tower, its weight shapes, the module names LoRA wraps in it) of each targeted tower."""
        towers = {"vision": (dims.vision_shapes, self.vision_modules), "lm": (dims.lm_shapes, self.lm_modules)}
        return [(tower, *towers[tower]) for tower in targeted_towers(self.target)]

    def validate(self, dims: ModelDims) -> None:
        if self.rank < 1:
            raise ConfigError(f"adapter.rank: {self.rank} must be >= 1")
        for tower, shapes, modules in self.targets(dims):
            matched = _matching_shapes(shapes, modules)
            if not matched:
                raise ConfigError(f"adapter.{tower}_modules: none of {modules} is a linear layer of the {tower} model")
            smallest = min(min(shape) for shape in matched)
            if self.rank > smallest:
                raise ConfigError(f"adapter.rank: {self.rank} exceeds the smallest targeted width {smallest}")

    def frozen_vision_layers(self, dims: ModelDims) -> int:
        return 0 if "vision" in targeted_towers(self.target) else dims.vision_layers

    def extra_trainable(self, dims: ModelDims) -> int:
        return sum(self.rank * sum(shape) for _, shapes, modules in self.targets(dims)
                   for shape in _matching_shapes(shapes, modules))
