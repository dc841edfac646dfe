"""The shared-nothing cluster: each node's study home is its own, the workspace and the S3 storage are everyone's."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from servers import BIN, finish
from shared_nothing import driver_pid, exists_on, job_details, ls_on, read_on, submit

pytestmark = pytest.mark.timeout(300)

JOB = '''
import json, os, sys
from pathlib import Path

import pyarrow.fs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

worker_node, storage = sys.argv[1:]
home = Path(os.environ["QSTUDY_HOME"])
(home / "head.txt").write_text("the head's")
ray.init()


@ray.remote(num_cpus=1)
def on_worker():
    (home / "worker.txt").write_text("the worker's")
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    with fs.open_output_stream(f"{root}/smoke/object.txt") as out:
        out.write(b"written on the worker")
    return {"node": ray.get_runtime_context().get_node_id(), "home": sorted(p.name for p in home.iterdir()),
            "data": sorted(p.name for p in (home / "data").iterdir()), "base": (home / "base").resolve().is_dir()}


seen = ray.get(on_worker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker_node, soft=False)).remote())
fs, root = pyarrow.fs.FileSystem.from_uri(storage)
with fs.open_input_stream(f"{root}/smoke/object.txt") as stream:
    seen["read_on_head"] = stream.read().decode()
seen.update(driver_pid=os.getpid(), head=sorted(p.name for p in home.iterdir()))
print("SEEN " + json.dumps(seen))
'''


def test_each_node_has_its_own_home_and_both_share_storage(shared_nothing, tiny_workspace, tmp_path):
    cluster = shared_nothing
    script = tmp_path / "job.py"  # the nodes share all but their home and Ray's temp dir: both see it
    script.write_text(textwrap.dedent(JOB))
    job = submit(cluster, str(BIN / "python"), str(script), cluster.worker_node, cluster.storage_uri())
    output = finish(job.process, timeout_s=240)
    seen = json.loads(output.split("SEEN ", 1)[1].splitlines()[0])

    details = job_details(cluster, job)
    assert details["status"] == "SUCCEEDED" and details["driver_node_id"] == cluster.head_node
    assert driver_pid(cluster, job) == seen["driver_pid"]
    # The task ran on the worker, where the home holds the workspace's links and its own file only.
    assert seen["node"] == cluster.worker_node
    assert seen["home"] == ["base", "data", "worker.txt"] and seen["base"]
    assert seen["data"] == sorted(os.listdir(tiny_workspace / "data"))
    assert seen["head"] == ["base", "data", "head.txt"]  # and the driver's home, after the task
    assert ls_on(cluster.worker_pid, cluster.home) == ["base", "data", "worker.txt"]
    assert ls_on(cluster.head_pid, cluster.home) == ["base", "data", "head.txt"]
    assert read_on(cluster.worker_pid, cluster.home / "worker.txt") == "the worker's"
    assert not exists_on(cluster.head_pid, cluster.home / "worker.txt")
    assert not cluster.home.exists()  # nor here, outside both nodes
    # Ray's temp dir is private too: only the head runs the GCS.
    logs = cluster.temp_dir / "session_latest" / "logs"
    assert "gcs_server.out" in ls_on(cluster.head_pid, logs) and "raylet.out" in ls_on(cluster.worker_pid, logs)
    assert "gcs_server.out" not in ls_on(cluster.worker_pid, logs)
    # What one node wrote to storage, the other read.
    assert seen["read_on_head"] == "written on the worker"
    assert cluster.s3_keys("smoke/") == ["smoke/object.txt"]
