"""The suite's own schedule: with pyproject's options, one xdist group's tests all run on one worker.

The slow tests rely on it (tests/conftest.py): side by side, their studies and 2-thread
trainings slow each other several-fold. pytest 9.2 with pytest-xdist 3.8 silently ignored the
groups, so the locked pair is checked here, on a throwaway suite of its own.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SUITE = '''
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("index", range(4))
@pytest.mark.xdist_group("serial")
def test_grouped(index):
    Path(os.environ["RECORD"], f"grouped-{index}").write_text(os.environ["PYTEST_XDIST_WORKER"])


@pytest.mark.parametrize("index", range(8))
def test_free(index):
    Path(os.environ["RECORD"], f"free-{index}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_a_group_runs_on_one_worker_and_the_rest_spreads(tmp_path):
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    (tmp_path / "test_suite.py").write_text(SUITE)
    record = tmp_path / "record"
    record.mkdir()
    done = subprocess.run([sys.executable, "-m", "pytest", *shlex.split(options), "-p", "no:cacheprovider",
                           "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                          env={"PATH": "/usr/bin:/bin", "RECORD": str(record)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    workers = {path.name: path.read_text() for path in record.iterdir()}
    grouped = {workers[f"grouped-{index}"] for index in range(4)}
    assert len(grouped) == 1, workers
    assert set(workers.values()) == {"gw0", "gw1"}, workers  # two workers, both used
