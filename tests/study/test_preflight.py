"""Every live node runs the driver's stack, or the study fails before its first trial, naming node, package and versions."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from servers import BIN, alive_nodes, free_port, stop, study, tiny_space, wait_until

from qstudy.study.preflight import (Capacity, NodeChecks, NodeType, health_problem, local_paths, probe_node,
                                    shape_problem, stack_versions, tracking_problem, version_mismatch)
from qstudy.study.storage import StudyStorage

DRIVER = {"python": "3.11.7", "ray": "2.60.0", "torch": "2.13.0+cpu", "transformers": "5.25.0",
          "deepspeed": "0.19.8", "qstudy": "0.1.0"}


@pytest.mark.parametrize("theirs, problem", [
    ({}, None),
    ({"torch": "2.13.0"}, None),  # a GPU node's CUDA build of the same release
    ({"python": "3.12.1"}, "python 3.12.1 differs from the driver's 3.11.7"),
    ({"transformers": "5.26.0"}, "transformers 5.26.0 differs from the driver's 5.25.0"),
    ({"torch": "2.14.0+cu128"}, "torch 2.14.0+cu128 differs from the driver's 2.13.0+cpu"),
    ({"deepspeed": "not installed"}, "deepspeed not installed differs from the driver's 0.19.8"),
])
def test_a_node_differs_in_any_package_of_the_stack(theirs, problem):
    line = version_mismatch("10.0.0.7 (abcd1234)", DRIVER, {**DRIVER, **theirs})
    if problem is None:
        assert line is None
    else:
        assert line.startswith("node 10.0.0.7 (abcd1234): " + problem) and "\n" not in line


def test_the_probe_reads_this_environment():
    versions = stack_versions()
    assert set(versions) == set(DRIVER) and all(versions.values())


@pytest.fixture
def node_with_other_transformers(ray_head, tmp_path):
    """A third node of the test cluster, no CPUs, whose Python finds transformers 9.9.9's metadata first on its
    path, whose `java` is broken, and whose HTTP requests go through a proxy that is down (as from a node outside
    the tracking server's network). Yields its Ray node id."""
    site = tmp_path / "site"
    dist_info = site / "transformers-9.9.9.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 9.9.9\n")
    java = site / "bin" / "java"
    java.parent.mkdir()
    java.write_text("#!/bin/sh\necho 'Error: could not find libjvm.so' >&2\nexit 1\n")
    java.chmod(0o755)
    # HTTP_PROXY in capitals: urllib reads it, gRPC (Ray's own traffic) reads only the lower-case names.
    env = {key: value for key, value in ray_head.env.items() if key.lower() not in ("http_proxy", "no_proxy")}
    python_path = os.pathsep.join(filter(None, (str(site), env.get("PYTHONPATH"))))
    env.update(PYTHONPATH=python_path, PATH=f"{java.parent}:{env['PATH']}", HTTP_PROXY=f"http://127.0.0.1:{free_port()}")
    temp_dir = Path(tempfile.mkdtemp(prefix="qsrayv", dir="/tmp"))
    token = ray_head.env["RAY_AUTH_TOKEN"]
    before = {node["node_id"] for node in alive_nodes(ray_head.dashboard, token)}
    node = subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--address", ray_head.address, "--node-ip-address", "127.0.0.1",
         "--num-cpus", "0", "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env=env, stdout=(temp_dir / "ray-start.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        joined = wait_until(lambda: {node["node_id"] for node in alive_nodes(ray_head.dashboard, token)} - before, 120,
                            f"the third node joining ({temp_dir / 'ray-start.log'})", node)
        (node_id,) = joined
        yield node_id
    finally:
        stop(node)
        wait_until(lambda: len(alive_nodes(ray_head.dashboard, token)) == len(before), 120, "the third node leaving")


def test_a_node_that_cannot_run_a_trial_fails_the_study_before_any_trial(
        ray_head, mlflow_server, study_home, tmp_path, node_with_other_transformers):
    process = study(ray_head, study_home, str(tiny_space(tmp_path)), "--name", "mismatch",
                    "--mlflow-uri", mlflow_server.uri)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-3000:]
    (address,) = [node["node_ip"] for node in alive_nodes(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"])
                  if node["node_id"] == node_with_other_transformers]
    node = f"node {address} ({node_with_other_transformers[:8]})"
    driver = stack_versions()["transformers"]
    lines = [line for line in output.splitlines() if line.startswith("qstudy: config error: ")]
    # One line per item, all of this node: the others pass.
    assert len(lines) == 3 and all(line.startswith(f"qstudy: config error: {node}: ") for line in lines), output[-3000:]
    versions, java, health = (line.removeprefix(f"qstudy: config error: {node}: ") for line in lines)
    assert versions.startswith(f"transformers 9.9.9 differs from the driver's {driver}")
    assert java == "java -version exits 1 (Error: could not find libjvm.so)"
    assert health.startswith(f"the MLflow server {mlflow_server.uri} does not answer /health from here (")
    assert "trial_" not in output and not (study_home / "studies" / "mismatch" / "study.json").exists()

@pytest.mark.parametrize("addresses, uri, problem", [
    (["127.0.0.1", "127.0.0.1"], "sqlite:////home/me/mlflow.db", None),  # the test cluster: one machine
    (["127.0.0.1", "127.0.0.2"], "http://127.0.0.1:5000", None),  # every loopback address is this machine
    (["10.0.0.5"], "sqlite:////home/me/mlflow.db", None),  # a one-node cluster on its own address
    (["10.0.0.5", "10.0.0.6"], "http://10.0.0.5:5000", None),
    (["10.0.0.5", "10.0.0.6"], "postgresql://mlflow@10.0.0.5/mlflow", None),
    (["10.0.0.5", "10.0.0.6"], "sqlite:////home/me/mlflow.db", "a store on the driver's disk"),
    (["10.0.0.5", "10.0.0.6"], "file:///home/me/mlruns", "a store on the driver's disk"),
    (["10.0.0.5", "10.0.0.6"], "/home/me/mlruns", "a store on the driver's disk"),
    (["10.0.0.5", "10.0.0.6"], "http://127.0.0.1:5000", "a loopback address"),
    (["127.0.0.1", "10.0.0.6"], "http://localhost:5000", "a loopback address"),
    (["10.0.0.5", "10.0.0.6"], "http://[::1]:5000", "a loopback address"),
])
def test_a_tracking_store_only_the_driver_reaches_fails_a_multi_machine_cluster(addresses, uri, problem):
    line = tracking_problem(uri, addresses)
    if problem is None:
        assert line is None
    else:
        assert line.startswith(f"--mlflow-uri {uri}: {problem}, but the cluster's nodes are on 2 machines")


def test_the_probe_names_each_item_a_node_lacks(tmp_path):
    readable = tmp_path / "videos"
    readable.mkdir()
    gone = tmp_path / "gone.json"
    # The driver wrote its probe file to its own disk; this "node" has a disk of its own at that path.
    node_disk = StudyStorage(str(tmp_path / "node-disk"), "s")
    checks = NodeChecks(f"http://127.0.0.1:{free_port()}",
                        local_paths([("data.video_dir", str(readable)), ("data.annotations", str(gone)),
                                     ("model.vision_encoder", "openai/clip-vit-base-patch16")]),  # a hub id: not a path
                        storage=node_disk, token="written-by-the-driver")
    assert checks.paths == (("data.video_dir", str(readable)), ("data.annotations", str(gone)))
    report = probe_node(checks)
    assert report["versions"] == stack_versions()
    (health, path, storage) = report["problems"]  # java runs here
    assert health.startswith(f"the MLflow server {checks.tracking_uri} does not answer /health from here (")
    assert path == f"data.annotations {gone} is not readable here (No such file or directory)"
    assert storage.startswith(f"the study's storage {tmp_path / 'node-disk' / 's'} does not hold what the driver "
                              "wrote there (a directory on one machine's disk is not shared)")
    node_disk.write_text(node_disk.path("probe"), checks.token)  # a shared disk: the driver's file is there
    assert len(probe_node(checks)["problems"]) == 2


def test_a_port_that_answers_another_protocol_is_a_server_that_does_not_answer():
    """Found when a node's own gRPC server held the MLflow server's port number in that node's network namespace."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"

        def answer_in_http2_frames():
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00\x00\x04\x00@\x00\x00")

        replier = threading.Thread(target=answer_in_http2_frames)
        replier.start()
        problem = health_problem(uri)
        replier.join()
    assert problem == f"the MLflow server {uri} does not answer /health from here (BadStatusLine: not an HTTP/1.1 reply)"


LIVE = Capacity((NodeType("127.0.0.1 (head0000)", {}, 1), NodeType("127.0.0.1 (work0000)", {"CPU": 2.0}, 1)),
                autoscaling=False, limits={})
# ray_cluster.yaml's shape: a head with no CPUs, up to 8 one-GPU workers, none running yet.
SCALING = Capacity((NodeType("head", {"CPU": 0.0}, 1), NodeType("gpu_worker", {"CPU": 8.0, "GPU": 1.0}, 8)),
                   autoscaling=True, limits={})


@pytest.mark.parametrize("capacity, worker, workers, driver, problem", [
    (LIVE, {"CPU": 0.99}, 2, 0.01, None),
    (LIVE, {"CPU": 1.0}, 2, 0.01, "workers_per_trial: 2 workers x cpus_per_worker 1.0 + 0.01 for the trial driver = "
                                  "2.01 CPUs, but the cluster has 2 CPUs"),
    (LIVE, {"CPU": 3.0}, 1, 0, "cpus_per_worker: 1 workers x cpus_per_worker 3.0 = 3 CPUs, but no node holds one "
                               "worker (3 CPUs); the largest, 127.0.0.1 (work0000), has 2 CPUs"),
    (LIVE, {"CPU": 1.0, "GPU": 1}, 1, 0, "use_gpu: 1 workers x cpus_per_worker 1.0 = 1 CPUs, 1 GPUs, but no node "
                                         "holds one worker (1 CPUs, 1 GPU); the largest, 127.0.0.1 (work0000), "
                                         "has 2 CPUs"),
    # Only a scaled-up cluster holds these: fine.
    (SCALING, {"CPU": 8.0, "GPU": 1}, 1, 0, None),
    (SCALING, {"CPU": 4.0, "GPU": 1}, 8, 0.01, None),
    # No node type holds one worker, however far it scales.
    (SCALING, {"CPU": 16.0, "GPU": 1}, 1, 0, "cpus_per_worker: 1 workers x cpus_per_worker 16.0 = 16 CPUs, 1 GPUs, "
                                             "but no node type holds one worker (16 CPUs, 1 GPU); the largest, "
                                             "gpu_worker, has 8 CPUs, 1 GPU"),
    # Each worker fits a node type; together they outgrow the cluster.
    (SCALING, {"CPU": 4.0, "GPU": 1}, 9, 0.01, "use_gpu: 9 workers x cpus_per_worker 4.0 + 0.01 for the trial driver "
                                               "= 36.01 CPUs, 9 GPUs, but the cluster can grow to 8 GPUs"),
    (SCALING, {"CPU": 6.0}, 8, 0.01, None),
    (SCALING, {"CPU": 6.0}, 9, 0.01, "workers_per_trial: 9 workers x cpus_per_worker 6.0 + 0.01 for the trial driver "
                                     "= 54.01 CPUs, but the cluster's node types hold 8 such workers at most once "
                                     "scaled up (a worker never spans nodes)"),
])
def test_a_trial_shape_fits_what_the_cluster_can_grow_to(capacity, worker, workers, driver, problem):
    line = shape_problem(capacity, worker, workers, driver)
    if problem is None:
        assert line is None
    else:
        assert line.startswith(problem) and "\n" not in line, line
