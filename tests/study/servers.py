"""Helpers of the study tests: ports, waiting, stopping what a test started, reading Ray, MLflow and S3 back."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SPACES = REPO / "search_spaces"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# A Ray head drains for 30 s on SIGTERM; at the session's end there is nothing left to drain.
HEAD_GRACE_S = 2


def stop(process: subprocess.Popen, grace_s: float = 10, sig: int = signal.SIGTERM) -> None:
    """``sig`` to the session we started it in, then SIGKILL every process still in that session."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    listing = subprocess.run(["ps", "-s", str(process.pid), "-o", "pid="], capture_output=True, text=True)
    for pid in (int(line) for line in listing.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait()


def state_api(dashboard_port: int) -> dict:
    """A test cluster's nodes' variable naming its own dashboard to Ray's state API clients inside it (Ray Train's
    placement-group cleaner among them): without it they look for "the" local Ray instance, and with two test
    clusters (or a local study's instance) on the machine they find several and give up."""
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


def ray_api(dashboard: str, token: str, path: str):
    """GET one of the dashboard's JSON endpoints (jobs, state API); token authentication covers them too."""
    request = urllib.request.Request(f"{dashboard}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def alive_nodes(dashboard: str, token: str) -> list[dict]:
    """The cluster's live nodes, as Ray's state API lists them (node_id, is_head_node, ...)."""
    try:
        nodes = ray_api(dashboard, token, "/api/v0/nodes")["data"]["result"]["result"]
    except OSError:
        return []
    return [node for node in nodes if node["state"] == "ALIVE"]


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address for `qstudy study --address`
    dashboard: str  # job API for `ray job submit --address`
    env: dict  # what a client process needs: the token, the temp dir
    worker_session: int  # the session id of every process the worker node started, trials included
    head_node: str  # Ray node ids
    worker_node: str


@dataclass(frozen=True)
class S3Server:
    """A moto S3 endpoint; ``credentials`` are what the MLflow server has and its clients lack."""

    endpoint: str
    bucket: str
    credentials: dict

    @functools.cached_property
    def client(self):
        """One boto3 client (making one costs more than a request to moto): tests poll storage twice a second."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **self.credentials)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def text(self, key: str) -> str:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read().decode()


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    log: Path
    artifacts: S3Server  # where the server keeps artifacts; clients reach them through the server only


# PostgreSQL refuses to run as root: as root, the test database runs as this account, in a directory it owns.
POSTGRES_USER = "postgres"
POSTGRES_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=None, key=lambda path: int(path.parent.name))


def postgres_account() -> dict:
    """Popen's arguments that drop root for PostgreSQL (``nobody`` where the distribution made no postgres account)."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        account = pwd.getpwnam("nobody")
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def init_postgres(directory: Path, user: str) -> subprocess.Popen:
    """``initdb`` of a throwaway cluster in ``directory``/data (started, not awaited); ``user`` is its superuser."""
    if POSTGRES_BIN is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql): the study tests' MLflow "
                           "server keeps its runs in it")
    account = postgres_account()
    if account:
        os.chown(directory, account["user"], account["group"])
    # --no-sync and, below, fsync=off: a database the session throws away needs no durability.
    return subprocess.Popen([str(POSTGRES_BIN / "initdb"), "-D", str(directory / "data"), "-U", user,
                             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
                            cwd=directory, stdout=(directory / "initdb.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, **account)


def start_postgres(directory: Path, port: int) -> subprocess.Popen:
    """The server of the cluster :func:`init_postgres` made, in the foreground, on loopback ``port`` and a socket
    in ``directory`` (not the system's /var/run/postgresql)."""
    return subprocess.Popen([str(POSTGRES_BIN / "postgres"), "-D", str(directory / "data"), "-p", str(port),
                             "-k", str(directory), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                            cwd=directory, stdout=(directory / "postgres.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, **postgres_account())


def postgres_answers(port: int, user: str) -> bool:
    return subprocess.run([str(POSTGRES_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres"]).returncode == 0


def remove_tree(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def tiny_space(tmp_path: Path, overrides: dict | None = None, **changes) -> Path:
    """search_spaces/qadapter_tiny.yaml cut down to seconds per trial; ``overrides`` update its run-config
    overrides, ``changes`` its top level."""
    space = yaml.safe_load((SPACES / "qadapter_tiny.yaml").read_text())
    space["overrides"].update({"train.epochs": 2, "train.max_steps_per_epoch": 6, "train.batch_size": 16,
                               "data.max_val_clips": 16, "eval.max_new_tokens": 12, **(overrides or {})})
    space.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def mlflow_runs(uri: str, experiment: str):
    """(parent runs, child runs) of one experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


def trial_process(session: int, trial_id: str) -> int | None:
    """The pid of the process in ``session`` that runs a Tune trial: Tune makes the trial's directory its cwd."""
    listing = subprocess.run(["ps", "-s", str(session), "-o", "pid="], capture_output=True, text=True)
    for pid in (int(line) for line in listing.stdout.split()):
        try:
            if os.readlink(f"/proc/{pid}/cwd").endswith(f"/trial_{trial_id}"):
                return pid
        except OSError:
            continue
    return None


def study(ray_head, home: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`qstudy study ARGS` as a driver process of its own, connected to the test head; ``env`` adds variables."""
    return subprocess.Popen([str(BIN / "qstudy"), "study", *args, "--address", ray_head.address],
                            env={**ray_head.env, "QSTUDY_HOME": str(home), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def local_study(home: Path, env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    """`qstudy study ARGS` on a local Ray instance with the home's embedded sqlite store, as on a laptop; returns the
    driver and that store's URI."""
    driver = subprocess.Popen([str(BIN / "qstudy"), "study", *args], env={**env, "QSTUDY_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return driver, f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"


def finish(process: subprocess.Popen, timeout_s: float = 500, code: int = 0) -> str:
    """The driver's output once it exited with ``code`` (0: a trial finished and none failed; see `qstudy --help`)."""
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == code, output[-5000:]
    return output


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))
