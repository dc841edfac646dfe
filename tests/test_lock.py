"""The committed locks are the truth: pyproject's ranges hold them, and this environment was installed from them."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
CPU_LOCK = REPO / "requirements" / "lock-cpu.txt"
CUDA_LOCK = REPO / "requirements" / "lock-cuda.txt"


def read_lock(text: str) -> dict[str, Version]:
    """``name -> version`` of every ``name==version`` line; comments and options are skipped."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(3))
    return pins


def declared(pyproject_text: str) -> list[Requirement]:
    project = tomllib.loads(pyproject_text)["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(text) for text in project["dependencies"] + [r for group in extras.values() for r in group]]


def lock_problems(pyproject_text: str, lock_text: str) -> list[str]:
    """What makes the lock disagree with pyproject: a dependency it lacks, or pins outside its range."""
    pins = read_lock(lock_text)
    problems = []
    for requirement in declared(pyproject_text):
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name}: in pyproject.toml, missing from the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}: locked {pins[name]} is outside {requirement.specifier}")
    return problems


def test_the_cpu_lock_holds_every_declared_dependency_within_its_range():
    assert lock_problems(PYPROJECT.read_text(), CPU_LOCK.read_text()) == []


@pytest.mark.parametrize("change, problem", [
    (lambda lock: re.sub(r"(?m)^mlflow==.*\n", "", lock), "mlflow: in pyproject.toml, missing from the lock"),
    (lambda lock: re.sub(r"(?m)^transformers==.*$", "transformers==4.57.0", lock),
     "transformers: locked 4.57.0 is outside <6,>=5.0"),
])
def test_a_lock_missing_a_dependency_or_outside_a_range_is_caught(change, problem):
    assert problem in lock_problems(PYPROJECT.read_text(), change(CPU_LOCK.read_text()))


def test_the_cuda_lock_pins_what_the_cpu_lock_pins():
    cpu, cuda = read_lock(CPU_LOCK.read_text()), read_lock(CUDA_LOCK.read_text())
    differ = {name: (str(cpu[name]), str(cuda[name])) for name in cpu.keys() & cuda.keys()
              if cpu[name].public != cuda[name].public}  # torch's +cpu build tag aside
    assert differ == {}
    assert str(cpu["torch"]).endswith("+cpu") and "nvidia-cublas" in cuda


def test_this_environment_was_installed_from_the_cpu_lock():
    installed = {canonicalize_name(dist.metadata["Name"]): Version(dist.version) for dist in metadata.distributions()}
    off = {name: (str(version), str(installed.get(name))) for name, version in read_lock(CPU_LOCK.read_text()).items()
           if installed.get(name) != version}
    assert off == {}, "reinstall from requirements/lock-cpu.txt (see the README)"


def test_pip_check_finds_no_conflict():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
