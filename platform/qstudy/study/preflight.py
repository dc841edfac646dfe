"""Checks of the cluster before the first trial: every node can run one, and the cluster can hold the trial's shape.

Ray needs the same Ray and Python on every node; the pickled Tune state, DeepSpeed's
checkpoints and the models' numerics need the rest of the stack to match too. A trial also
needs, on whichever node it lands: Java (pycocoevalcap's tokenizer and METEOR), the tracking
server, the study's data and base model where they are local paths, and the study's storage
(study/storage.py), where it reads and writes what other nodes wrote: the driver writes a file
there that every node must read back. A local directory on the driver's disk fails here on a
cluster whose nodes share no disk, naming the storage, instead of after a trial's first epoch.
A node that lacks one
(an autoscaled node that resolved its own versions, a stale image, a node outside the server's
network) fails the study here, one line per node and item, before any trial and any MLflow run,
instead of in some trial's traceback. Imports no torch: versions come from the installed
distributions' metadata.

A cluster spans several machines when its live nodes have more than one address, counting
every loopback address as one and the same machine (the test cluster's raylets all run on one
machine and share its address). On such a cluster a tracking store on the driver's disk (sqlite, ``file:``) or a
loopback server URI names something else, or nothing, on every other node.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import math
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from packaging.version import InvalidVersion, Version

from qstudy.core.errors import ConfigError, one_line
from qstudy.study.storage import StudyStorage

# What must match the driver's on every node. torch is compared without its build tag:
# the head installs the CPU lock and GPU nodes the CUDA lock, with the same pins.
STACK = ("ray", "torch", "transformers", "deepspeed", "qstudy")
NOT_INSTALLED = "not installed"
PROBE_TIMEOUT_S = 120
CHECK_TIMEOUT_S = 30  # each of a probe's own checks (java's start, the server's answer)
# Where the Ray cluster launcher puts the cluster's config on the head (Ray Tune looks for it too).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


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


@dataclass(frozen=True)
class NodeChecks:
    """What a probe checks on its node besides the versions: the tracking server, and paths that must be readable."""

    tracking_uri: str
    paths: tuple[tuple[str, str], ...] = ()  # (the config field, its local path)
    storage: StudyStorage | None = None
    token: str = ""  # what check_nodes writes to the storage's probe file, which every node must read back


def _java_problem() -> str | None:
    try:
        finished = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except FileNotFoundError:
        return ("java is not installed (pycocoevalcap's tokenizer and METEOR need it: "
                "apt-get install default-jre-headless)")
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"java does not run ({error})"
    if finished.returncode != 0:
        said = (finished.stderr or finished.stdout).strip().splitlines()
        return f"java -version exits {finished.returncode}{f' ({said[-1]})' if said else ''}"
    return None


def health_problem(uri: str) -> str | None:
    """Why the MLflow server at ``uri`` cannot be used from this node, as one line; None when it answers (or is no server)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CHECK_TIMEOUT_S) as response:
            if response.status == 200:
                return None
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    except http.client.HTTPException as error:  # e.g. a gRPC server that happens to hold that port on this node
        reason = f"{type(error).__name__}: not an HTTP/1.1 reply"
    return f"the MLflow server {uri} does not answer /health from here ({reason})"


def _path_problem(field: str, path: str) -> str | None:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except OSError as error:
        return f"{field} {path} is not readable here ({error.strerror or error})"
    return None


PROBE_FILE = "probe"  # in the study's storage while check_nodes runs


def _storage_problem(storage: StudyStorage, token: str) -> str | None:
    try:
        seen = storage.read_text(storage.path(PROBE_FILE))
        if seen != token:
            return (f"the study's storage {storage.where()} does not hold what the driver wrote there (a directory "
                    "on one machine's disk is not shared): give --storage an object store (s3://bucket/prefix, "
                    "gs://...) or a filesystem mounted on every node")
        written = storage.path(f"{PROBE_FILE}.{os.getpid()}.{os.uname().nodename}")
        storage.write_text(written, token)
        storage.delete(written)
    except Exception as error:  # noqa: BLE001 - pyarrow raises OSError and its own errors for a store it cannot use
        return f"cannot read and write the study's storage {storage.where()} ({one_line(str(error), 200)})"
    return None


def probe_node(checks: NodeChecks) -> dict:
    """Run on a node: its stack's versions, and a line for each of ``checks`` that fails there."""
    problems = [_java_problem(), health_problem(checks.tracking_uri),
                *(_path_problem(field, path) for field, path in checks.paths),
                _storage_problem(checks.storage, checks.token) if checks.storage else None]
    return {"versions": stack_versions(), "problems": [problem for problem in problems if problem]}


def local_paths(fields: Iterable[tuple[str, str | None]]) -> tuple[tuple[str, str], ...]:
    """The ``(field, path)`` pairs whose value is a path on this machine; a hub id (``org/model``) is none."""
    found = {}
    for field, value in fields:
        if value and (os.path.isabs(value) or os.path.exists(value)):
            found.setdefault(os.path.abspath(value), field)
    return tuple((field, path) for path, field in found.items())


def study_checks(tracking_uri: str, space, storage: StudyStorage, reads_data: bool) -> NodeChecks:
    """The node checks of a study (``space``: its SearchSpace): its tracking URI and storage, and the data and base
    its trials read (``reads_data``: not replayed curves) where those are local paths."""
    fields = []
    for _, config in space.data_variants() if reads_data else ():
        fields += [(f"data.{name}", getattr(config.data, name)) for name in ("annotations", "video_dir",
                                                                              "test_annotations")]
        fields += [(f"model.{name}", getattr(config.model, name)) for name in ("vision_encoder", "language_model",
                                                                                "tokenizer", "projector")]
    return NodeChecks(tracking_uri, local_paths(fields), storage, secrets.token_hex(8))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def machines(addresses: Iterable[str]) -> set[str]:
    """The machines behind nodes' addresses: every loopback address is the same one, this machine."""
    return {"loopback" if _is_loopback(address) else address for address in addresses}


def tracking_problem(uri: str, addresses: Iterable[str]) -> str | None:
    """Why ``uri`` cannot serve a cluster whose nodes have ``addresses``, else None (one machine: anything goes)."""
    spread = machines(addresses)
    if len(spread) <= 1:
        return None
    parsed = urlparse(uri)
    where = f"the cluster's nodes are on {len(spread)} machines"
    if parsed.scheme in ("", "file", "sqlite"):
        return (f"--mlflow-uri {uri}: a store on the driver's disk, but {where}; run `mlflow server` "
                "where every node reaches it and pass its http:// URI")
    if parsed.scheme in ("http", "https") and _is_loopback(parsed.hostname or ""):
        return (f"--mlflow-uri {uri}: a loopback address, but {where}; use the server's address on the "
                "cluster's network")
    return None


def _node_name(node: dict) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"


def check_nodes(checks: NodeChecks) -> None:
    """Fail, one line per node and problem, unless every live node runs the driver's stack and passes ``checks``.

    The tracking URI is checked against the nodes' addresses first, before Ray schedules anything.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    problem = tracking_problem(checks.tracking_uri, [node["NodeManagerAddress"] for node in nodes])
    if problem:
        raise ConfigError(problem)
    with _probe_file(checks.storage, checks.token):
        problems = _probe_problems(nodes, checks)
    if problems:
        raise ConfigError(problems)


@contextlib.contextmanager
def _probe_file(storage: StudyStorage | None, token: str):
    """The driver's probe file in ``storage`` while the nodes look for it; a study directory it created goes too."""
    if storage is None:
        yield
        return
    created = not storage.exists(storage.root)
    try:
        storage.write_text(storage.path(PROBE_FILE), token)
    except Exception as error:  # noqa: BLE001 - as in _storage_problem
        raise ConfigError(f"cannot write to the study's storage {storage.where()} "
                          f"({one_line(str(error), 200)})") from None
    try:
        yield
    finally:
        storage.delete(storage.root if created else storage.path(PROBE_FILE))


def _probe_problems(nodes: list[dict], checks: NodeChecks) -> list[str]:
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    pending = {_node_name(node): probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(checks) for node in nodes}
    driver = stack_versions()
    problems = []
    for name, reference in pending.items():
        try:
            report = ray.get(reference, timeout=PROBE_TIMEOUT_S)
        except GetTimeoutError:
            problems.append(f"node {name}: did not answer the probe within {PROBE_TIMEOUT_S} s")
            continue
        except RayError as error:  # e.g. qstudy is not importable there
            reason = str(error).strip().splitlines()[-1]
            problems.append(f"node {name}: the probe failed: {reason}")
            continue
        mismatch = version_mismatch(name, driver, report["versions"])
        problems += [mismatch] if mismatch else []
        problems += [f"node {name}: {line}" for line in report["problems"]]
    return problems


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or can start: its resources, and how many of it at most (``math.inf``: no cap)."""

    name: str
    resources: dict[str, float]
    max_count: float


@dataclass(frozen=True)
class Capacity:
    """What the cluster can grow to (the autoscaler's node types), or has (its live nodes, one type each)."""

    node_types: tuple[NodeType, ...]
    autoscaling: bool
    limits: dict[str, float]  # cluster-wide caps on a resource's total (the autoscaler's max_resources)

    @property
    def kind(self) -> str:
        return "node type" if self.autoscaling else "node"

    def total(self, resource: str) -> float:
        total = sum(t.resources.get(resource, 0.0) * t.max_count for t in self.node_types
                    if t.resources.get(resource, 0.0) and t.max_count)
        return min(total, self.limits.get(resource, math.inf))

    def holds(self, bundle: dict[str, float]) -> float:
        """How many ``bundle``s (one Ray Train worker's resources) fit, none split across nodes."""
        per_node = [(min(math.floor(t.resources.get(key, 0.0) / need + 1e-9) for key, need in bundle.items() if need),
                     t.max_count) for t in self.node_types]
        return sum(count * nodes for count, nodes in per_node if count and nodes)

    def largest(self) -> NodeType:
        return max(self.node_types, key=lambda t: (t.resources.get("GPU", 0.0), t.resources.get("CPU", 0.0)))


def launcher_node_types(config: dict) -> tuple[NodeType, ...]:
    """The node types of a Ray cluster launcher config (``ray_cluster.yaml`` as the launcher prepared it)."""
    most = config.get("max_workers", math.inf)
    return tuple(NodeType(name, {key: float(value) for key, value in spec.get("resources", {}).items()},
                          1 if name == config.get("head_node_type") else min(spec.get("max_workers", most), most))
                 for name, spec in config.get("available_node_types", {}).items())


def cluster_capacity() -> Capacity:
    """The autoscaler's node types when the cluster publishes them, else its live nodes.

    An autoscaler that reports its config to the GCS (the record Ray Train checks its worker
    groups against) comes first; the cluster launcher's own config on the head (where `ray job
    submit` runs the driver) next: the launcher's autoscaler in Ray 2.60 reports nothing.
    """
    import ray
    import yaml

    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        types = tuple(NodeType(group.name, {key: float(value) for key, value in group.resources.items()},
                               math.inf if group.max_count == -1 else group.max_count)
                      for group in config.node_group_configs)
        return Capacity(types, True, {key: float(value) for key, value in config.max_resources.items()})
    launcher = Path(LAUNCHER_CONFIG).expanduser()
    if launcher.is_file():
        return Capacity(launcher_node_types(yaml.safe_load(launcher.read_text())), True, {})
    live = tuple(NodeType(_node_name(node), dict(node["Resources"]), 1) for node in ray.nodes() if node["Alive"])
    return Capacity(live, False, {})


def _amounts(resources: dict[str, float]) -> str:
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    return f"{cpus:g} CPUs" + (f", {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "")


def shape_problem(capacity: Capacity, worker: dict[str, float], workers: int, driver_cpus: float) -> str | None:
    """Why a trial of ``workers`` x ``worker`` resources (+ its driver's CPUs) never fits ``capacity``, else None.

    Each worker must fit on one node; the workers and the driver together within the cluster's
    totals. A shape that fits only once the autoscaler has added nodes fits.
    """
    driver = f" + {driver_cpus} for the trial driver" if driver_cpus else ""
    shape = (f"{workers} workers x cpus_per_worker {worker['CPU']}{driver} = {workers * worker['CPU'] + driver_cpus:g} "
             f"CPUs{f', {workers} GPUs' if worker.get('GPU') else ''}")
    if not capacity.holds(worker):
        cpu_only = capacity.holds({"CPU": worker["CPU"]})
        field = "use_gpu" if cpu_only else "cpus_per_worker"
        largest = capacity.largest()
        return (f"{field}: {shape}, but no {capacity.kind} holds one worker ({_amounts(worker)}); the largest, "
                f"{largest.name}, has {_amounts(largest.resources)}")
    verb = "can grow to" if capacity.autoscaling else "has"
    for resource, need in sorted(worker.items()):
        total_need = workers * need + (driver_cpus if resource == "CPU" else 0)
        if total_need > capacity.total(resource) + 1e-9:
            if resource == "CPU":
                return (f"workers_per_trial: {shape}, but the cluster {verb} {capacity.total(resource):g} CPUs; lower "
                        "workers_per_trial or cpus_per_worker (e.g. 0.99 so the driver fits beside them)")
            return (f"use_gpu: {shape}, but the cluster {verb} {capacity.total(resource):g} {resource}s; lower "
                    "workers_per_trial")
    if capacity.holds(worker) < workers:
        return (f"workers_per_trial: {shape}, but the cluster's {capacity.kind}s hold {capacity.holds(worker):g} such "
                f"workers at most{' once scaled up' if capacity.autoscaling else ''} (a worker never spans nodes)")
    return None
