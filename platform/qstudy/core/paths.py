"""Where qstudy keeps its files, and which names may become a path component."""

from __future__ import annotations

import os
from pathlib import Path

from qstudy.core.errors import ConfigError


def qstudy_home() -> Path:
    """Where generated data, the cached base and local studies live (``$QSTUDY_HOME``, default ./.qstudy)."""
    return Path(os.environ.get("QSTUDY_HOME", ".qstudy")).resolve()


def expand_path(value: str) -> str:
    """Expand ``${QSTUDY_HOME}``, other environment variables and ``~`` in a path-like value."""
    os.environ.setdefault("QSTUDY_HOME", str(qstudy_home()))
    return os.path.expanduser(os.path.expandvars(value))


def check_path_component(value: str, where: str) -> str:
    """``value`` if it names one entry inside a directory: a name or id read from a file must not reach outside it."""
    if value in ("", ".", "..") or any(sep in value for sep in ("/", "\\", "\0")):
        raise ConfigError(f"{where}: {value!r} is not a plain name (no path separators, not '.' or '..')")
    return value
