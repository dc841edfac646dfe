"""Real servers for the study tests: a two-node Ray cluster with token authentication and the team's MLflow.

MLflow runs as ``ray_cluster.yaml`` starts it: ``mlflow server`` on PostgreSQL (a throwaway
instance, initdb'd per session) with its artifacts in S3 (moto's server on loopback), proxied
(``--serve-artifacts``), so that the clients (trials, export, evaluate, report) hold no S3
credentials.

The cluster is shaped like ``ray_cluster.yaml``: a head with no CPUs (it runs the services and
the study driver, never a trial) and one worker node with 2 CPUs, joined by a second ``ray
start --address``. Everything is started once per session, on free ports and private
directories, and stopped in the fixtures' finalizers whatever the tests did. ``ray start
--block`` stays in the foreground and takes the processes it started down with it on SIGTERM,
so stopping a node never touches another Ray instance on the machine (``ray stop`` would).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from servers import (BIN, HEAD_GRACE_S, MlflowServer, RayHead, S3Server, alive_nodes, answers, free_port,
                     init_postgres, postgres_answers, remove_tree, start_postgres, state_api, stop, wait_until)
from shared_nothing import SharedNothingCluster, shared_nothing_cluster


# What MLflow's S3 artifact store reads; only the server gets it, so every client proves it needs none.
S3_ENV = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def test_env(tiny_workspace) -> dict:
    """Client environment: the venv first on PATH, one thread per trial, no S3 access."""
    env = {key: value for key, value in os.environ.items() if key not in S3_ENV}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AIR_NEW_OUTPUT": "0",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def servers(test_env, tmp_path_factory):
    """The team deployment, small: a two-node Ray cluster, and `mlflow server` on PostgreSQL with its artifacts in S3.

    Ray (~10 s) starts first; PostgreSQL (initdb ~1 s) and the moto S3 endpoint come up meanwhile,
    then MLflow (~10 s) beside the Ray head. Stopped in reverse order at the end.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="qsray", dir="/tmp"))  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    gcs_port, dashboard_port = free_port(), free_port()
    ray_env = {**test_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(temp_dir),
               **state_api(dashboard_port)}
    ray_log = temp_dir / "ray-start.log"
    ray = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--num-cpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env=ray_env, stdout=ray_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    from moto.server import ThreadedMotoServer

    database_dir = Path(tempfile.mkdtemp(prefix="qspg", dir="/tmp"))  # the server's socket lives here too
    initdb = init_postgres(database_dir, "mlflow")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server would log every request
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    postgres = mlflow = worker = None
    try:
        artifacts = S3Server(endpoint="http://{}:{}".format(*s3.get_host_and_port()), bucket="qstudy-artifacts",
                             credentials={"aws_access_key_id": "moto", "aws_secret_access_key": "moto"})
        artifacts.client.create_bucket(Bucket=artifacts.bucket)
        if initdb.wait(60) != 0:
            raise RuntimeError(f"initdb failed ({database_dir / 'initdb.log'})")
        postgres_port = free_port()
        postgres = start_postgres(database_dir, postgres_port)
        wait_until(lambda: postgres_answers(postgres_port, "mlflow"), 60,
                   f"PostgreSQL ({database_dir / 'postgres.log'})", postgres)
        mlflow_dir = tmp_path_factory.mktemp("mlflow")
        mlflow_port = free_port()
        mlflow_log = mlflow_dir / "server.log"
        server_env = {**test_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                      "MLFLOW_S3_ENDPOINT_URL": artifacts.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                      **{key.upper(): value for key, value in artifacts.credentials.items()}}
        # +psycopg2: the lock's driver (SQLAlchemy's default for postgresql:// is psycopg 3, which it lacks).
        mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri",
             f"postgresql+psycopg2://mlflow@127.0.0.1:{postgres_port}/postgres",
             "--artifacts-destination", f"s3://{artifacts.bucket}/mlflow", "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
            env=server_env, stdout=mlflow_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

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
               MlflowServer(uri=uri, log=mlflow_log, artifacts=artifacts))
    finally:
        if worker is not None:
            stop(worker)
        stop(ray, grace_s=HEAD_GRACE_S)
        if mlflow is not None:
            stop(mlflow)
        if postgres is not None:
            stop(postgres, sig=signal.SIGINT)  # a fast shutdown: SIGTERM would wait for clients to leave
        stop(initdb)
        s3.stop()
        remove_tree(database_dir)


@pytest.fixture(scope="session")
def shared_nothing(servers, test_env, tiny_workspace, tmp_path_factory) -> SharedNothingCluster:
    """A second two-node cluster shaped like the first, whose nodes share nothing but the network.

    Each node has its own private QSTUDY_HOME and Ray temp dir at the same paths; their shared
    storage is a bucket on the session's S3 endpoint (tests/study/shared_nothing.py). MLflow is
    the session's server. Starts in ~15 s.
    """
    with shared_nothing_cluster(test_env, tiny_workspace, servers[1].artifacts,
                                tmp_path_factory.mktemp("shared-nothing")) as cluster:
        yield cluster


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
