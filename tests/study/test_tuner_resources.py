"""A trial shape the cluster can never place, even scaled up, is refused before anything starts (Ray Train would
wait forever); one that only needs the autoscaler to add nodes is not."""

from __future__ import annotations

import subprocess

import pytest
from servers import BIN, alive_nodes, study, tiny_space

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(("changes", "args", "message"), [
    ({}, ["--workers-per-trial", "3"],  # the worker node has 2 CPUs
     "workers_per_trial: 3 workers x cpus_per_worker 1.0 + 0.01 for the trial driver = 3.01 CPUs, "
     "but the cluster has 2 CPUs"),
    ({}, ["--workers-per-trial", "2"],  # whole CPUs leave none for the trial's driver
     "workers_per_trial: 2 workers x cpus_per_worker 1.0 + 0.01 for the trial driver = 2.01 CPUs, "
     "but the cluster has 2 CPUs"),
    ({"cpus_per_worker": 3}, [],  # one worker trains in the trial's own actor: no driver beside it
     "cpus_per_worker: 1 workers x cpus_per_worker 3.0 = 3 CPUs, but no node holds one worker (3 CPUs); "
     "the largest, {worker}, has 2 CPUs"),
    ({"use_gpu": True}, [], "use_gpu: 1 workers x cpus_per_worker 1.0 = 1 CPUs, 1 GPUs, but no node holds one "
                            "worker (1 CPUs, 1 GPU); the largest, {worker}, has 2 CPUs"),
], ids=["three-workers", "no-room-for-the-driver", "one-big-worker", "no-gpu"])
def test_unplaceable_trials_fail_naming_the_setting(ray_head, mlflow_server, study_home, tmp_path, changes, args,
                                                    message):
    driver = study(ray_head, study_home, str(tiny_space(tmp_path, **changes)), "--name", "unplaceable",
                   "--mlflow-uri", mlflow_server.uri, *args)
    output, _ = driver.communicate(timeout=240)
    assert driver.returncode == 2, output[-3000:]
    (address,) = [node["node_ip"] for node in alive_nodes(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"])
                  if node["node_id"] == ray_head.worker_node]
    message = message.format(worker=f"{address} ({ray_head.worker_node[:8]})")
    assert f"qstudy: config error: {message}" in output and "Traceback" not in output, output[-3000:]
    assert not (study_home / "studies" / "unplaceable").exists()  # no study directory, no trial


# Publishes node types to the GCS as an autoscaler would (the ClusterConfig record Ray Train V2 reads with
# get_max_resources_from_cluster_config), checks two shapes against them, and removes the record: a shape only a
# scaled-up cluster holds passes the check; `qstudy study` with one no node type holds exits 2, naming both.
REPORT = """
import contextlib, io, sys
import ray
from ray.core.generated import autoscaler_pb2
from qstudy.cli import main
from qstudy.study.preflight import cluster_capacity, shape_problem

address, space, uri = sys.argv[1:]
ray.init(address=address, configure_logging=False, log_to_driver=False)
gcs = ray._private.worker.global_worker.gcs_client
config = autoscaler_pb2.ClusterConfig()
for name, resources, most in (("head", {"CPU": 0}, 1), ("cpu_worker", {"CPU": 2}, 4),
                              ("gpu_worker", {"CPU": 4, "GPU": 1}, 2)):
    config.node_group_configs.add(name=name, resources=resources, max_count=most)
gcs.report_cluster_config(config.SerializeToString())
try:
    capacity = cluster_capacity()
    print("types:", sorted(t.name for t in capacity.node_types))
    print("grows:", shape_problem(capacity, {"CPU": 2.0}, 4, 0.01))
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        print("exit:", main(["study", space, "--name", "never", "--address", address, "--mlflow-uri", uri]))
    print("errors:", " | ".join(line for line in errors.getvalue().splitlines() if line.startswith("qstudy:")))
finally:
    gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    print("removed:", ray._private.state.state.get_cluster_config() is None)
"""


def test_an_autoscaling_cluster_is_checked_against_its_node_types(ray_head, mlflow_server, study_home, tmp_path):
    """The test cluster's autoscaler is emulated: no autoscaler in Ray 2.60 writes the GCS record.

    The GCS has the RPC (``ReportClusterConfig``, ``GcsClient.report_cluster_config``) and Ray
    Train V2 reads its record, but neither the cluster launcher's autoscaler (v1), nor v2, nor the
    fake multi-node provider calls it (the installed ``ray`` has no Python caller), so
    ``RAY_FAKE_CLUSTER=1`` would leave it empty. The record is written here as a reporter would:
    the serialized ``autoscaler_pb2.ClusterConfig`` through the GCS client. The live cluster
    (2 CPUs) holds neither shape; node types of up to 4 x 2 CPUs and 2 x (4 CPUs, 1 GPU) hold the
    first once scaled up, and none holds an 8-CPU worker.
    """
    space = tiny_space(tmp_path, cpus_per_worker=8)
    done = subprocess.run([str(BIN / "python"), "-c", REPORT, ray_head.address, str(space), mlflow_server.uri],
                          env={**ray_head.env, "QSTUDY_HOME": str(study_home)}, capture_output=True, text=True,
                          timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["types"] == "['cpu_worker', 'gpu_worker', 'head']"
    assert lines["grows"] == "None"  # 4 workers x 2 CPUs + the driver: 8.01 of the 16 CPUs it can grow to
    assert lines["exit"] == "2" and lines["errors"] == (
        "qstudy: config error: cpus_per_worker: 1 workers x cpus_per_worker 8.0 = 8 CPUs, but no node type holds one "
        "worker (8 CPUs); the largest, gpu_worker, has 4 CPUs, 1 GPU"), done.stdout[-3000:]
    assert lines["removed"] == "True" and not (study_home / "studies" / "never").exists()
