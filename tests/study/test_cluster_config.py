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


def _words_after(command: str, flag: str) -> list[str]:
    words = command.replace(";", " ").split()
    return [words[index + 1] for index, word in enumerate(words[:-1]) if word == flag]


def test_the_head_runs_mlflow_on_postgresql_with_artifacts_in_s3_and_keeps_its_secrets_private():
    text = (REPO / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    start_head = " ".join(config["head_start_ray_commands"])
    (server,) = [command for command in config["head_start_ray_commands"] if "mlflow server" in command]
    assert _words_after(server, "--backend-store-uri")[0].startswith("postgresql+psycopg2://")
    assert _words_after(server, "--artifacts-destination")[0].startswith("s3://") and "--serve-artifacts" in server
    # The database's data directory is durable: on the shared volume, the same for initdb and pg_ctl.
    (database,) = set(_words_after(start_head, "-D"))
    assert database.startswith("/mnt/shared/") and "listen_addresses=127.0.0.1" in start_head
    assert "postgresql" in " ".join(config["head_setup_commands"])
    lock = (REPO / "requirements" / "lock-cpu.txt").read_text().split()
    assert any(pin.startswith("psycopg2-binary==") for pin in lock) and any(pin.startswith("boto3==") for pin in lock)
    # Secrets are created readable by their owner alone; every node reads the token from its file.
    for secret in ("/mnt/shared/ray_auth_token", "/mnt/shared/mlflow_db_password"):
        assert f"(umask 077; python -c \"import secrets; print(secrets.token_hex(32))\" > {secret})" in start_head
    assert "chmod 600 /mnt/shared/ray_auth_token" in start_head and "(umask 077; echo" in start_head  # ~/.pgpass
    worker_start = " ".join(config["worker_start_ray_commands"])
    for command in (start_head, worker_start):
        assert "RAY_AUTH_TOKEN_PATH=/mnt/shared/ray_auth_token" in command and "RAY_AUTH_TOKEN=" not in command
    # The header's instructions: the token comes down to a private file, and the client reads that file.
    header = " ".join(line.lstrip("# ").rstrip("\\") for line in text.splitlines() if line.startswith("#"))
    local = header.split("ray rsync-down ray_cluster.yaml /mnt/shared/ray_auth_token ")[1].split()[0]
    assert f"chmod 600 {local}" in header and f"RAY_AUTH_TOKEN_PATH={local}" in header


def test_a_trial_shape_is_checked_against_the_launchers_node_types():
    from ray.autoscaler._private.util import prepare_config

    from qstudy.study.preflight import Capacity, launcher_node_types, shape_problem

    types = launcher_node_types(prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text())))
    assert {(t.name, t.max_count, t.resources.get("CPU"), t.resources.get("GPU")) for t in types} == {
        ("head", 1, 0, None), ("gpu_worker", 8, 8, 1)}
    capacity = Capacity(types, autoscaling=True, limits={})
    # None of it runs yet (min_workers 0, a head without CPUs): still, 8 one-GPU workers fit once scaled up.
    assert shape_problem(capacity, {"CPU": 7.99, "GPU": 1}, 8, 0.01) is None
    assert shape_problem(capacity, {"CPU": 4.0, "GPU": 1}, 9, 0.01).endswith(
        "but the cluster can grow to 8 GPUs; lower workers_per_trial")
