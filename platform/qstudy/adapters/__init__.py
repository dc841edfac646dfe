"""PEFT methods as study arms: every module in this package registers one method by name.

Adding a method is adding one file here: a dataclass config decorated with ``@register``
(see ``base.py`` for the contract). Importing this package imports no torch.
"""

import importlib
import pkgutil

from qstudy.adapters.base import (
    ADAPTERS,
    AdapterConfig,
    adapter_config_from_mapping,
    apply_adapter,
    count_parameters,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "layers"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ADAPTERS",
    "AdapterConfig",
    "adapter_config_from_mapping",
    "apply_adapter",
    "count_parameters",
    "register",
]
