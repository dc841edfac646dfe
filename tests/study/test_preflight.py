"""Every live node runs the driver's stack, or the study fails before its first trial, naming node, package and versions."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from servers import BIN, alive_nodes, free_port, stop, study, tiny_space, wait_until

from qstudy.study.preflight import stack_versions, version_mismatch

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
    """A third node of the test cluster, no CPUs, whose Python finds transformers 9.9.9's metadata first on its path."""
    site = tmp_path / "site"
    dist_info = site / "transformers-9.9.9.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 9.9.9\n")
    temp_dir = Path(tempfile.mkdtemp(prefix="qsrayv", dir="/tmp"))
    before = len(alive_nodes(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"]))
    node = subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--address", ray_head.address, "--node-ip-address", "127.0.0.1",
         "--num-cpus", "0", "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(temp_dir),
         "--disable-usage-stats"],
        env={**ray_head.env, "PYTHONPATH": str(site)}, stdout=(temp_dir / "ray-start.log").open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len(alive_nodes(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"])) > before, 120,
                   f"the third node joining ({temp_dir / 'ray-start.log'})", node)
        yield
    finally:
        stop(node)
        wait_until(lambda: len(alive_nodes(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"])) == before, 120,
                   "the third node leaving")


def test_a_node_with_another_transformers_fails_the_study_before_any_trial(
        ray_head, study_home, tmp_path, node_with_other_transformers):
    process = study(ray_head, study_home, str(tiny_space(tmp_path)), "--name", "mismatch")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-3000:]
    driver = stack_versions()["transformers"]
    assert f"transformers 9.9.9 differs from the driver's {driver}" in output
    assert "trial_" not in output and not (study_home / "studies" / "mismatch" / "study.json").exists()
