"""Checks on every live node of the cluster before the first trial: the driver's tested stack runs everywhere.

Ray needs the same Ray and Python on every node; the pickled Tune state, DeepSpeed's
checkpoints and the models' numerics need the rest of the stack to match too. A node that
installed something else (an autoscaled node that resolved its own versions, a stale image)
fails the study here, in one line, instead of in some trial's traceback. Imports no torch:
versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.version import InvalidVersion, Version

from qstudy.core.errors import ConfigError

# What must match the driver's on every node. torch is compared without its build tag:
# the head installs the CPU lock and GPU nodes the CUDA lock, with the same pins.
STACK = ("ray", "torch", "transformers", "deepspeed", "qstudy")
NOT_INSTALLED = "not installed"
PROBE_TIMEOUT_S = 120


def stack_versions() -> dict[str, str]:
    """This process's Python and the versions of ``STACK`` installed where it runs."""
    versions = {"python": ".".join(map(str, sys.version_info[:3]))}
    for package in STACK:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = NOT_INSTALLED
    return versions


def _release(version: str) -> str:
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def version_mismatch(node: str, driver: dict[str, str], theirs: dict[str, str]) -> str | None:
    """The line naming the first package whose version on ``node`` differs from the driver's, else None."""
    for package, version in driver.items():
        if _release(theirs.get(package, NOT_INSTALLED)) != _release(version):
            return (f"node {node}: {package} {theirs.get(package, NOT_INSTALLED)} differs from the driver's {version}; "
                    "install the same lock on every node (requirements/lock-cpu.txt, or lock-cuda.txt on GPU nodes)")
    return None


def check_node_versions() -> None:
    """Run one zero-CPU probe on every live node and fail on the first whose stack differs from this driver's."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(stack_versions)
    pending = {}
    for node in ray.nodes():
        if node["Alive"]:
            name = f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            pending[name] = probe.options(scheduling_strategy=strategy).remote()
    driver = stack_versions()
    for name, reference in pending.items():
        try:
            theirs = ray.get(reference, timeout=PROBE_TIMEOUT_S)
        except GetTimeoutError:
            raise ConfigError(f"node {name}: did not answer the version probe within {PROBE_TIMEOUT_S} s") from None
        except RayError as error:  # e.g. qstudy is not importable there
            reason = str(error).strip().splitlines()[-1]
            raise ConfigError(f"node {name}: the version probe failed: {reason}") from None
        problem = version_mismatch(name, driver, theirs)
        if problem:
            raise ConfigError(problem)
