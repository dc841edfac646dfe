"""The network side of a study: a Ray address where nothing listens, and what the embedded default listens on.

The local study runs as a `qstudy study` process of its own, as a user runs it; every process
it starts (Ray's GCS, raylet, agents, workers, the trials) is a descendant of it, so its
listening sockets are the process tree's.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from servers import BIN, free_port, tiny_space

from qstudy.cli import main

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


def test_a_local_study_listens_on_loopback_only_and_prints_its_table_and_summary(
        study_home, tmp_path, test_env):
    space = tiny_space(tmp_path, trials=2, concurrency=1, sampler="random", seed=1)
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
    assert "study local: 2 finished" in output and "best CIDEr: " in output
    for noise in ("PTBTokenizer", "tokenization", "Checkpoint successfully created", "alembic",
                  "ds_accelerator", "deduplicates logs", "Loading weights", "database tables",
                  "A new study created"):
        assert noise not in output, noise
    assert output.count("== Status ==") <= 8, output
    assert Path(study_dir / "tune").is_dir()
