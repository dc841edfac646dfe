"""PEFT methods as study arms: each subpackage ``methods/<name>/`` is one method.

Importing this package registers every method's config (``<name>/config.py``) and imports no
torch; a method's modules (``<name>/modules.py``) load only when it is injected.
"""

import importlib
import pkgutil

from qstudy.methods.registry import ADAPTERS, AdapterConfig, adapter_config_from_mapping, register

for _method in pkgutil.iter_modules(__path__):
    if _method.ispkg:
        importlib.import_module(f"{__name__}.{_method.name}.config")

__all__ = ["ADAPTERS", "AdapterConfig", "adapter_config_from_mapping", "register"]
