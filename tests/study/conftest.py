"""Real servers for the study tests: a Ray head with token authentication and an ``mlflow server``.

Both are started once per session, on free ports and private directories, and stopped in the
fixtures' finalizers whatever the tests did. ``ray start --block`` stays in the foreground
and takes the processes it started down with it on SIGTERM, so stopping the head never
touches another Ray instance on the machine (``ray stop`` would).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest
from servers import BIN, MlflowServer, RayHead, answers, free_port, stop, wait_until


@pytest.fixture(scope="session")
def test_env(tiny_workspace) -> dict:
    """Client environment: the venv first on PATH, a shared DeepSpeed op cache, one thread per trial."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AIR_NEW_OUTPUT": "0",
            "TORCH_EXTENSIONS_DIR": str(tiny_workspace / "torch_extensions"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def servers(test_env, tmp_path_factory):
    """Start the Ray head and the MLflow server side by side (each takes ~10 s), stop both at the end."""
    temp_dir = Path(tempfile.mkdtemp(prefix="qsray", dir="/tmp"))  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    ray_env = {**test_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(temp_dir)}
    gcs_port, dashboard_port = free_port(), free_port()
    ray_log = temp_dir / "ray-start.log"
    ray = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
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
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: answers(f"{dashboard}/api/gcs_healthz"), 120, f"Ray head ({ray_log})", ray)
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: answers(f"{uri}/health"), 120, f"MLflow server ({mlflow_log})", mlflow)
        # The GCS binds the node's own address whatever --node-ip-address says; Ray writes it here,
        # sometimes only after the dashboard already answers.
        current = temp_dir / "ray_current_cluster"
        wait_until(current.exists, 60, f"Ray's cluster address file ({ray_log})", ray)
        address = current.read_text().strip()
        yield (RayHead(address=address, dashboard=dashboard, env=ray_env, session=ray.pid),
               MlflowServer(uri=uri, log=mlflow_log))
    finally:
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
