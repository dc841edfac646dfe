"""The package's layers: import-linter's contracts (pyproject.toml) hold, and no module imports itself round a cycle.

Both checks read late (function-level) imports too, so a cycle cannot hide behind one.
Each runs on a copy of the package with one bad import added, to show it can fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def import_cycles(package: str = "qstudy") -> list[list[str]]:
    """Every strongly connected set of modules of ``package`` (Tarjan), sorted: each one is an import cycle."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # recursion depth is bounded by the package's ~100 modules
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted(cycles)


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "platform")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _cycles_in(root: Path) -> str:
    script = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from test_layers import import_cycles; " \
             "print(import_cycles())"
    env = {**os.environ, "PYTHONPATH": str(root / "platform")}
    return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_the_layer_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_there_is_no_import_cycle():
    assert import_cycles() == []


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(REPO / "platform" / "qstudy", tmp_path / "platform" / "qstudy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def _add(root: Path, module: str, line: str) -> None:
    path = root / "platform" / "qstudy" / module
    path.write_text(path.read_text() + f"\n\n{line}\n")


# (module to change, what it gets, the contract that breaks)
VIOLATIONS = [
    ("core/errors.py", "import qstudy.config", "Layers"),
    ("analysis/pareto.py", "def late():\n    import qstudy.study.space", "Layers"),
    ("model/captioner.py", "from qstudy.methods import registry", "The model knows no method"),
    ("methods/lora/config.py", "import torch", "Method configs and their registry are torch-free"),
    ("methods/qadapter/config.py", "from qstudy.methods.layers import sublayer", "Method configs and their registry"),
    ("methods/layers.py", "from qstudy.train import engine", "Method modules sit below training"),
    ("methods/layers.py", "from qstudy.methods import inject", "Layers"),
]


@pytest.mark.parametrize("module, line, contract", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_an_upward_import_breaks_a_contract(package_copy, module, line, contract):
    _add(package_copy, module, line)
    result = _lint(package_copy)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout


def test_a_cycle_inside_one_layer_is_found(package_copy):
    _add(package_copy, "train/engine.py", "def late():\n    from qstudy.train import checks")
    assert _cycles_in(package_copy) == "[['qstudy.train.checks', 'qstudy.train.engine']]"
