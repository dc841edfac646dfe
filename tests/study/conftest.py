"""Real servers for the study tests: a two-node Ray cluster with token authentication and an ``mlflow server``.

The cluster is shaped like ``ray_cluster.yaml``: a head with no CPUs (it runs the services and
the study driver, never a trial) and one worker node with 2 CPUs, joined by a second ``ray
start --address``. Everything is started once per session, on free ports and private
directories, and stopped in the fixtures' finalizers whatever the tests did. ``ray start
--block`` stays in the foreground and takes the processes it started down with it on SIGTERM,
so stopping a node never touches another Ray instance on the machine (``ray stop`` would).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest
from servers import BIN, MlflowServer, RayHead, alive_nodes, answers, free_port, stop, wait_until


@pytest.fixture(scope="session")
def test_env(tiny_workspace) -> dict:
    """Client environment: the venv first on PATH, a shared DeepSpeed op cache, one thread per trial."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AIR_NEW_OUTPUT": "0",
            "TORCH_EXTENSIONS_DIR": str(tiny_workspace / "torch_extensions"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def servers(test_env, tmp_path_factory):
    """Start the Ray cluster and the MLflow server side by side (each takes ~10 s), stop all at the end."""
    temp_dir = Path(tempfile.mkdtemp(prefix="qsray", dir="/tmp"))  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    ray_env = {**test_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(temp_dir)}
    gcs_port, dashboard_port = free_port(), free_port()
    ray_log = temp_dir / "ray-start.log"
    ray = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--num-cpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env=ray_env, stdout=ray_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    mlflow_dir = tmp_path_factory.mktemp("mlflow")
    mlflow_port = free_port()
    mlflow_log = mlflow_dir / "server.log"
    mlflow = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
         "--artifacts-destination", str(mlflow_dir / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        env={**test_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: answers(f"{dashboard}/api/gcs_healthz"), 120, f"Ray head ({ray_log})", ray)
        # The GCS binds the node's own address whatever --node-ip-address says; Ray writes it here,
        # sometimes only after the dashboard already answers.
        current = temp_dir / "ray_current_cluster"
        wait_until(current.exists, 60, f"Ray's cluster address file ({ray_log})", ray)
        address = current.read_text().strip()
        # A temp dir of its own, as a real node has its own disk: in a shared session directory
        # the worker node's runtime-env agent unpacks the job's working dir over the one the
        # head's driver runs in, and the driver's cwd vanishes. An agent port of its own too
        # (the default is fixed and may be taken).
        worker_dir = Path(tempfile.mkdtemp(prefix="qsrayw", dir="/tmp"))
        worker_log = worker_dir / "ray-start.log"
        worker = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
             "--num-cpus", "2", "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(worker_dir),
             "--disable-usage-stats"],
            env=ray_env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: answers(f"{uri}/health"), 120, f"MLflow server ({mlflow_log})", mlflow)

        def both_nodes():
            nodes = alive_nodes(dashboard, token)
            return nodes if len(nodes) == 2 else None

        nodes = wait_until(both_nodes, 120, f"the worker node joining ({worker_log})", worker)
        (head_node,) = [node["node_id"] for node in nodes if node["is_head_node"]]
        (worker_node,) = [node["node_id"] for node in nodes if not node["is_head_node"]]
        yield (RayHead(address=address, dashboard=dashboard, env=ray_env, worker_session=worker.pid,
                       head_node=head_node, worker_node=worker_node),
               MlflowServer(uri=uri, log=mlflow_log))
    finally:
        if worker is not None:
            stop(worker)
        stop(ray)
        stop(mlflow)


@pytest.fixture
def study_home(tiny_workspace, tmp_path) -> Path:
    """A fresh QSTUDY_HOME for one test's studies, sharing the workspace's data and tiny base."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("data", "base"):
        (home / name).symlink_to(tiny_workspace / name)
    return home


@pytest.fixture(scope="session")
def ray_head(servers) -> RayHead:
    return servers[0]


@pytest.fixture(scope="session")
def mlflow_server(servers) -> MlflowServer:
    return servers[1]
