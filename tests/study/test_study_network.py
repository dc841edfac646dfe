"""The network side of a study: a Ray address where nothing listens, and what the embedded default listens on.

The local study runs as a `qstudy study` process of its own, as a user runs it; every process
it starts (Ray's GCS, raylet, agents, workers, the trials) is a descendant of it, so its
listening sockets are the process tree's. Its output is piped, as CI or `ray job logs` read
it: one line per trial event. It has a parameter budget one of its two arms is over, and
shows what the study does with that arm too: one local study serves all three checks.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from servers import BIN, free_port, metric_steps, mlflow_runs, tiny_space
from shapes import tiny_dims

from qstudy.cli import main
from qstudy.study.progress import EVENT_LINE
from qstudy.methods import adapter_config_from_mapping
from qstudy.tracking import schema
from qstudy.tracking.schema import FINISHED, INFEASIBLE, STATUS_TAG

pytestmark = pytest.mark.timeout(600)


def test_a_ray_address_where_nothing_listens_fails_in_seconds_naming_it(study_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSTUDY_HOME", str(study_home))
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = main(["study", str(tiny_space(tmp_path)), "--address", address])
    assert code == 2 and time.monotonic() - started < 20
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert address in line and "no Ray cluster" in line
    assert not (study_home / "studies").exists()


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``root`` and its descendants."""
    sockets = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets |= {(c.laddr.ip, c.laddr.port, process.name()) for c in process.net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sockets


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 too


BIG_QADAPTER = {"num_query_tokens": 16, "insertion_layers": "all", "gating": "sigmoid", "rank": 32}


def test_a_local_study_listens_on_loopback_only_prints_its_table_and_never_trains_the_arm_over_budget(
        study_home, tmp_path, test_env):
    dims = tiny_dims()
    frozen = adapter_config_from_mapping({"method": "frozen"}).count_trainable(dims)
    big = adapter_config_from_mapping({"method": "qadapter", **BIG_QADAPTER}).count_trainable(dims)
    budget = (frozen + big) // 2
    arms = {"frozen": {}, "qadapter": {f"adapter.{key}": value for key, value in BIG_QADAPTER.items()}}
    space = tiny_space(tmp_path, trials=2, concurrency=1, sampler="random", seed=0, parameter_budget=budget, arms=arms,
                       overrides={"train.epochs": 1})
    ray_dir = tempfile.mkdtemp(prefix="qsloc", dir="/tmp")  # Ray's socket paths must stay short
    driver = subprocess.Popen([str(BIN / "qstudy"), "study", str(space), "--name", "local"],
                              env={**test_env, "QSTUDY_HOME": str(study_home), "RAY_TMPDIR": ray_dir},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(driver.pid)
    seen = set()
    try:
        while driver.poll() is None:
            seen |= _listening(root)
            time.sleep(0.5)
        output = driver.communicate(timeout=60)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    print(output)  # shown when an assertion below fails
    assert driver.returncode == 0, output[-5000:]
    processes = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= processes, seen  # the sampling saw Ray's services
    assert not [s for s in seen if not _loopback(s[0])], sorted(seen)

    # The live table and the summary; nothing the trials printed (-v shows it).
    study_dir = study_home / "studies" / "local"
    assert f"Study directory: {study_dir}" in output and "Result logdir" not in output
    assert "study local: 1 finished, 1 infeasible" in output and "best CIDEr: " in output
    for noise in ("PTBTokenizer", "tokenization", "Checkpoint successfully created", "alembic",
                  "ds_accelerator", "deduplicates logs", "Loading weights", "database tables",
                  "A new study created"):
        assert noise not in output, noise
    assert output.count("== Status ==") <= 8, output
    # Piped: one line per trial event, no live table, no terminal escapes.
    running = output[:re.search(r"^study local: .* in \d+ s$", output, re.M).start()]  # the summary follows
    events = [EVENT_LINE.match(line) for line in running.splitlines() if line.startswith("trial ")]
    assert all(events), [line for line in running.splitlines() if line.startswith("trial ")]
    by_arm: dict[str, list[str]] = {}
    for event in events:
        by_arm.setdefault(event["arm"], []).append(event["event"])
    assert by_arm["frozen"] == ["started", "epoch 1/1", "finished"] and by_arm["qadapter"][-1] == "infeasible", by_arm
    assert "\x1b[" not in output and output.splitlines()[0] == f"Study directory: {study_dir}"
    assert Path(study_dir / "tune").is_dir()

    # The arm over the budget: recorded infeasible with its closed-form count, never trained.
    uri = f"sqlite:///{study_home / 'mlflow' / 'mlflow.db'}"
    _, children = mlflow_runs(uri, "qadapter-tiny")
    runs = {run.data.params["method"]: run for run in children if run.data.tags[schema.STUDY_TAG] == "local"}
    assert set(runs) == {"frozen", "qadapter"}  # each arm once: the study enqueues every arm first
    over, under = runs["qadapter"], runs["frozen"]
    assert over.data.tags[STATUS_TAG] == INFEASIBLE and over.data.params["over_budget"] == "True"
    assert over.data.metrics["trainable_params"] == big > budget  # the closed form, logged before training
    assert metric_steps(uri, over.info.run_id, "val_cider") == []
    trials = study_dir / "trials"
    assert not (trials / over.data.tags[schema.TRIAL_ID_TAG] / "adapter.safetensors").exists()
    assert under.data.tags[STATUS_TAG] == FINISHED and under.data.params["over_budget"] == "False"
    assert under.data.metrics["trainable_params"] == frozen <= budget and "cider" in under.data.metrics
    assert (trials / under.data.tags[schema.TRIAL_ID_TAG] / "adapter.safetensors").exists()
