"""ray_cluster.yaml is a cluster-launcher config the installed Ray accepts, with the shape the docs promise."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError naming the field

    head = config["available_node_types"][config["head_node_type"]]
    workers = [spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and any(spec["resources"].get("GPU", 0) >= 1 for spec in workers)
    start_head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start_head and "RAY_AUTH_MODE=token" in start_head
    assert "--num-cpus=0" in start_head  # no trial on the head, as the tests' cluster (conftest.py)
    assert "0.0.0.0" not in yaml.safe_dump(config)
    # Every node installs the committed lock, pin for pin: the CPU one on the head, the CUDA one on GPU workers.
    installs = {kind: " ".join(config[f"{kind}_setup_commands"]) for kind in ("head", "worker")}
    for kind, lock in (("head", "requirements/lock-cpu.txt"), ("worker", "requirements/lock-cuda.txt")):
        assert all(part in installs[kind] for part in ("pip install --no-deps", lock, "-e /home/ubuntu/qstudy"))
    assert any("jre" in command for command in config["setup_commands"])  # pycocoevalcap needs java on every node
