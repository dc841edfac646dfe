"""The benchmarks and the cluster job import only names the package has, late imports included.

They run outside the suite (minutes to hours), so a module moved or a helper renamed would
otherwise break them unseen.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(REPO / "bench").glob("*.py"), *(REPO / "jobs").glob("*.py")])


def qstudy_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from qstudy... import name`` in ``path``, wherever it sits."""
    return [(node.module, alias.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qstudy")
            for alias in node.names]


def missing(imports: list[tuple[str, str]]) -> list[str]:
    gone = []
    for module, name in imports:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError:
            gone.append(module)
            continue
        if not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                gone.append(f"{module}.{name}")
    return gone


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{path.parent.name}/{path.name}" for path in SCRIPTS])
def test_every_qstudy_name_a_script_imports_exists(script):
    imports = qstudy_imports(script)
    assert missing(imports) == []


def test_a_renamed_helper_is_caught():
    assert missing([("qstudy.cli", "_quiet_libraries"), ("qstudy.model", "dims")]) == ["qstudy.cli._quiet_libraries",
                                                                                        "qstudy.model.dims"]
