"""PEFT methods as study arms: each subpackage ``methods/<name>/`` is one method, named in ``registry.py``.

Importing this package imports every method's config and no torch; a method's modules
(``<name>/modules.py``) load with ``methods/inject.py``, which names each method's ``inject``.
"""

from qstudy.methods.base import AdapterConfig
from qstudy.methods.registry import ADAPTERS, Adapter, adapter_config_from_mapping

__all__ = ["ADAPTERS", "Adapter", "AdapterConfig", "adapter_config_from_mapping"]
