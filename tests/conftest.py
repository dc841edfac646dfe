"""Shared fixtures: a session-wide tiny workspace (synthetic mp4 clips + pretrained tiny base)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import av  # noqa: F401 - before decord: its bundled FFmpeg, loaded first, makes PyAV's libvpx encoder fail to open
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
# The fast tier (`pytest -m "not slow" -n 2`) leaves out what costs minutes or starts servers: any test on
# the session's Ray cluster and MLflow server, and these, each measured at 10 s or more.
SLOW_FIXTURES = {"servers", "ray_head", "mlflow_server"}
SLOW_TESTS = (
    "tests/train/test_floors.py",  # the floors grid: trains every floor under 1 and 2 threads (~3 min)
    "tests/analysis/test_browser.py",  # headless Chromium
    "tests/study/test_study_network.py::test_a_local_study_listens_on_loopback_only",  # a local Ray study
    "tests/train/test_device.py::test_a_ray_task_holding_a_gpu",  # a local Ray instance
    "tests/train/test_recipe.py::test_two_zero3_ranks",  # two torchrun ranks
    "tests/study/test_evaluate.py::test_evaluate_",  # a local Ray study, then `qstudy evaluate` on a local Ray instance
    "tests/test_readme_commands.py::test_every_readme_command_runs",  # the README's studies on local Ray instances
    "tests/study/test_progress.py::test_on_a_terminal",  # a local Ray study in tmux
    "tests/study/test_progress.py::test_piped_output",  # a local Ray study, replayed
)


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, worker_id) -> Path:
    """QSTUDY_HOME with target-domain clips and the cached tiny base, built once per test run.

    Reuses ``$QSTUDY_TEST_CACHE`` across sessions when set (local runs); CI builds it fresh. The
    run's pytest-xdist workers share one: the first builds it, the others wait for it.
    """
    from filelock import FileLock

    from qstudy.cli import prepare_tiny_workspace

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    home = Path(os.environ.get("QSTUDY_TEST_CACHE") or shared / "qstudy_home")
    home.mkdir(parents=True, exist_ok=True)
    os.environ["QSTUDY_HOME"] = str(home)  # before the build: the base's frames go to this home's frame cache
    with FileLock(str(home) + ".lock"):
        prepare_tiny_workspace(home)
    return home


@pytest.fixture(scope="session")
def tiny_random_base(tmp_path_factory):
    """A ``ModelConfig`` of random tiny towers with a rank-4 merger: for the mechanics, not for learning."""
    from dataclasses import replace

    from qstudy.data.synthetic import caption_vocabulary
    from qstudy.model.tiny import build_tiny

    return replace(build_tiny(tmp_path_factory.mktemp("tiny"), caption_vocabulary()), temporal_merger_rank=4)


@pytest.fixture
def corrupt_target_data(tiny_workspace, tmp_path) -> Path:
    """A copy of the workspace's target dataset whose first training video is garbage bytes."""
    data = Path(shutil.copytree(tiny_workspace / "data" / "target", tmp_path / "corrupt-target"))
    annotations = json.loads((data / "annotations.json").read_text())
    first_train = next(v["video_id"] for v in annotations["videos"] if v["split"] == "train")
    (data / "videos" / f"{first_train}.mp4").write_bytes(b"not an mp4 at all")
    return data
