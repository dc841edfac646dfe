"""A two-node Ray cluster whose nodes share nothing but the network: each node in a mount namespace of its own.

Each node (``ray start --block``) runs under ``unshare --mount --propagation private`` with a
private tmpfs over one directory that holds the study home and Ray's temp dir, and another over
/dev/shm. Both nodes use the same paths, so a path is valid on either node while its contents
are each node's own, as on two machines. The tiny workspace's data and base stay visible to
both (linked from each node's home), like data baked into a node image; so does the rest of
the file system (the venv, a test's tmp_path). Processes keep one PID namespace and one
network: ports are on 127.0.0.1 and a pid seen here is the node's. A driver has to run inside
the head's namespace (it talks to the raylet over unix sockets), so studies go in with ``ray
job submit``, whose driver runs on the head; :func:`read_on` and friends look at one node's
private disk with ``nsenter``. Storage shared by the nodes is S3 (moto), through pyarrow.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from servers import (BIN, HEAD_GRACE_S, S3Server, alive_nodes, answers, free_port, ray_api, state_api, stop,
                     wait_until)

STORAGE_BUCKET = "qstudy-storage"
STORAGE_PREFIX = "studies"
# Mounts the node's private disk (the directory in $1, /dev/shm), links the shared workspace ($2) into
# its home, then becomes the node's `ray start` (the remaining arguments).
NODE_SCRIPT = """set -e
mount -t tmpfs -o mode=0755 qsnode "$1"
mount -t tmpfs -o mode=1777 qsshm /dev/shm
mkdir "$1/home" "$1/ray"
ln -s "$2/data" "$1/home/data"
ln -s "$2/base" "$1/home/base"
shift 2
exec "$@"
"""


@dataclass(frozen=True)
class SharedNothingCluster:
    dashboard: str  # job API, for `ray job submit --address`
    address: str  # GCS address
    env: dict  # what a client outside the nodes needs (`ray job submit`, the state API): the token
    home: Path  # QSTUDY_HOME on every node: the same path, each node's own contents
    temp_dir: Path  # Ray's temp dir on every node, private likewise
    head_pid: int  # the head's `ray start` process: a target for `nsenter` (read_on, ls_on, exists_on)
    worker_pid: int  # the worker node's, also the session id of what it started (trials: see servers.trial_process)
    head_node: str  # Ray node ids
    worker_node: str
    storage: S3Server  # the bucket the nodes share, for S3Server.keys
    node_env: dict  # the variables the nodes run with beyond the client's: S3 credentials, QSTUDY_HOME

    def storage_uri(self, path: str = "") -> str:
        """A pyarrow URI for ``path`` under the shared storage (Ray Tune's ``storage_path`` takes it)."""
        endpoint = self.storage.endpoint.removeprefix("http://")
        key = "/".join(part for part in (STORAGE_PREFIX, path.strip("/")) if part)
        return f"s3://{self.storage.bucket}/{key}?endpoint_override={endpoint}&scheme=http"

    def s3_keys(self, prefix: str = "") -> list[str]:
        """Keys in the shared storage under ``prefix`` (relative to the storage root, as in :meth:`storage_uri`)."""
        root = f"{STORAGE_PREFIX}/"
        return [key.removeprefix(root) for key in self.storage.keys(root + prefix)]

    def s3_text(self, key: str) -> str:
        """One object of the shared storage (``key`` relative to the storage root)."""
        return self.storage.text(f"{STORAGE_PREFIX}/{key}")


def _node(root: Path, workspace: Path, ray_start: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A node: ``ray start --block ...`` in a mount namespace of its own, in a session of its own."""
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", NODE_SCRIPT, "node",
                             str(root), str(workspace), str(BIN / "ray"), "start", "--block", *ray_start],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _kill_namespace(namespace: str) -> None:
    """SIGKILL every process left in one node's mount namespace (job drivers run in sessions of their own)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "mnt") == namespace:
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to inspect (pid 1 in a container)
            continue


@contextmanager
def shared_nothing_cluster(client_env: dict, workspace: Path, s3: S3Server, logs: Path):
    """Start the cluster (head: no CPUs, a dashboard, token authentication; worker: 2 CPUs) and stop it on exit.

    ``client_env``: the study tests' process environment; ``s3``: the session's moto endpoint and
    credentials, where a bucket for the nodes' storage is created; ``logs``: where the nodes' output goes.
    """
    if os.geteuid() != 0:
        raise RuntimeError("the shared-nothing cluster needs root: each node mounts tmpfs in a mount namespace of "
                           "its own (unshare --mount)")
    started = time.monotonic()
    storage = S3Server(endpoint=s3.endpoint, bucket=STORAGE_BUCKET, credentials=s3.credentials)
    storage.client.create_bucket(Bucket=storage.bucket)
    root = Path(tempfile.mkdtemp(prefix="qssn", dir="/tmp"))  # a mount point on each node; Ray's sockets below it
    home, temp_dir = root / "home", root / "ray"
    token = secrets.token_hex(32)
    env = {**client_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # pyarrow's S3 client takes credentials from the environment; without them it writes anonymously and
    # moto keeps the aws-chunked framing as the object's bytes. No instance metadata service to ask here.
    node_env = {"QSTUDY_HOME": str(home), "AWS_ACCESS_KEY_ID": storage.credentials["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": storage.credentials["aws_secret_access_key"],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    dashboard_port = free_port()
    ray_env = {**env, **node_env, "RAY_TMPDIR": str(temp_dir), **state_api(dashboard_port)}
    head = _node(root, workspace,
                 ["--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()), "--num-cpus", "0",
                  "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                  str(dashboard_port), "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port",
                  str(free_port()), "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                 ray_env, logs / "head.log")
    worker = None
    namespaces = []
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_until(lambda: answers(f"{dashboard}/api/gcs_healthz"), 120, f"Ray head ({logs / 'head.log'})", head)
        namespaces.append(_mount_namespace(head.pid))
        current = temp_dir / "ray_current_cluster"  # on the head's disk (see servers' fixture on its contents)
        wait_until(lambda: exists_on(head.pid, current), 60, f"Ray's cluster address file ({logs / 'head.log'})", head)
        address = read_on(head.pid, current).strip()
        worker = _node(root, workspace,
                       ["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
                        "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
                        "--disable-usage-stats"],
                       ray_env, logs / "worker.log")

        def both_nodes():
            nodes = alive_nodes(dashboard, token)
            return nodes if len(nodes) == 2 else None

        nodes = wait_until(both_nodes, 120, f"the worker node joining ({logs / 'worker.log'})", worker)
        namespaces.append(_mount_namespace(worker.pid))
        (head_node,) = [node["node_id"] for node in nodes if node["is_head_node"]]
        (worker_node,) = [node["node_id"] for node in nodes if not node["is_head_node"]]
        print(f"shared-nothing cluster up in {time.monotonic() - started:.1f} s (logs: {logs})")
        yield SharedNothingCluster(dashboard=dashboard, address=address, env=env, home=home, temp_dir=temp_dir,
                                   head_pid=head.pid, worker_pid=worker.pid, head_node=head_node,
                                   worker_node=worker_node, storage=storage, node_env=node_env)
    finally:
        if worker is not None:
            stop(worker)
        stop(head, grace_s=HEAD_GRACE_S)
        for namespace in namespaces:
            _kill_namespace(namespace)
        root.rmdir()  # the nodes' tmpfs went with their namespaces; the mount point is empty here


@dataclass(frozen=True)
class Job:
    id: str  # the submission id: the job API's key
    process: subprocess.Popen  # `ray job submit`, following the job's output until it ends (servers.finish)


def submit(cluster: SharedNothingCluster, *entrypoint: str, env: dict | None = None, wait: bool = True,
           submission_id: str | None = None) -> Job:
    """``ray job submit`` of ``entrypoint`` (e.g. ``qstudy study SPACE --name X``): its driver runs on the head.

    The job runs with QSTUDY_HOME at the nodes' home and the venv first on PATH, plus ``env``;
    ``wait=False`` returns once the job is submitted (``--no-wait``).
    """
    submission_id = submission_id or f"qssn-{uuid.uuid4().hex[:12]}"
    job_env = {"QSTUDY_HOME": str(cluster.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    command = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
               "--runtime-env-json", json.dumps({"env_vars": job_env}), *([] if wait else ["--no-wait"]),
               "--", *entrypoint]
    return Job(submission_id, subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))


def job_details(cluster: SharedNothingCluster, job: Job | str) -> dict:
    """The job API's record of a job (status, driver_info, driver_node_id, ...)."""
    job_id = job.id if isinstance(job, Job) else job
    return ray_api(cluster.dashboard, cluster.env["RAY_AUTH_TOKEN"], f"/api/jobs/{job_id}")


def driver_pid(cluster: SharedNothingCluster, job: Job | str, timeout_s: float = 120) -> int:
    """The pid of the job's driver (the process that connected to Ray), once it has connected."""
    def connected():
        try:
            info = job_details(cluster, job).get("driver_info")
        except OSError:  # the job API answers 404 until the submission is recorded
            return None
        return int(info["pid"]) if info else None

    return wait_until(connected, timeout_s, f"the driver of job {job.id if isinstance(job, Job) else job}")


def on(pid: int, *command: str) -> subprocess.CompletedProcess:
    """``command`` in the mount namespace of node process ``pid`` (its private disk), output captured."""
    return subprocess.run(["nsenter", "--target", str(pid), "--mount", "--", *command], capture_output=True,
                          text=True, timeout=60)


def exists_on(pid: int, path: Path | str) -> bool:
    return on(pid, "test", "-e", str(path)).returncode == 0


def read_on(pid: int, path: Path | str) -> str:
    done = on(pid, "cat", "--", str(path))
    if done.returncode != 0:
        raise FileNotFoundError(f"{path} on the node of pid {pid}: {done.stderr.strip()}")
    return done.stdout


def ls_on(pid: int, path: Path | str) -> list[str]:
    """The names in directory ``path`` on the node of pid ``pid``, sorted."""
    done = on(pid, "ls", "-A", "--", str(path))
    if done.returncode != 0:
        raise FileNotFoundError(f"{path} on the node of pid {pid}: {done.stderr.strip()}")
    return sorted(done.stdout.split("\n")[:-1])
