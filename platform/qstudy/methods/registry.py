"""Every method's config by name: the table a run config's ``adapter.method`` and a search space's arms are read through.

One line a method, as peft maps its method names to their configs. Torch-free: the sampler
and the parameter budget read configs before anything is built; ``methods/inject.py`` maps
the same names to each method's ``inject``.
"""

from __future__ import annotations

from typing import Annotated, Any

from qstudy.core.errors import ConfigError
from qstudy.core.validate import from_mapping
from qstudy.methods.ademvl.config import AdemVLConfig
from qstudy.methods.base import AdapterConfig
from qstudy.methods.bottleneck.config import BottleneckConfig
from qstudy.methods.compacter.config import CompacterConfig
from qstudy.methods.frozen.config import FrozenConfig
from qstudy.methods.full.config import FullFineTuningConfig
from qstudy.methods.hyperformer.config import HyperformerConfig
from qstudy.methods.lora.config import LoraConfig
from qstudy.methods.prompt_tuning.config import PromptTuningConfig
from qstudy.methods.qadapter.config import QAdapterConfig

ADAPTERS: dict[str, type[AdapterConfig]] = {
    "qadapter": QAdapterConfig,
    "full": FullFineTuningConfig,
    "frozen": FrozenConfig,
    "lora": LoraConfig,
    "bottleneck": BottleneckConfig,
    "compacter": CompacterConfig,
    "hyperformer": HyperformerConfig,
    "prompt_tuning": PromptTuningConfig,
    "ademvl": AdemVLConfig,
}


def adapter_config_from_mapping(data: Any, where: str = "adapter") -> AdapterConfig:
    """The config ``data["method"]`` names, its other keys validated as that config's fields."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"missing key {where}.method (one of: {', '.join(sorted(ADAPTERS))})")
    fields = dict(data)
    method = fields.pop("method")
    if method not in ADAPTERS:
        raise ConfigError(f"{where}.method: unknown method {method!r} (one of: {', '.join(sorted(ADAPTERS))})")
    return from_mapping(ADAPTERS[method], fields, where)


# A run config's ``adapter``: any registered method's config, read by its ``method`` key.
Adapter = Annotated[AdapterConfig, adapter_config_from_mapping]
