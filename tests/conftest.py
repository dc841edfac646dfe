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
# The fast tier (`pytest -m "not slow"`) leaves out what costs minutes or starts servers. Any test on the
# session's Ray cluster and MLflow server is slow; so are these, each measured at 10 s or more.
SLOW_FIXTURES = {"servers", "ray_head", "mlflow_server", "shared_nothing"}
SLOW_TESTS = (
    "tests/analysis/test_browser.py",  # headless Chromium
    "tests/study/test_study_network.py::test_a_local_study_listens_on_loopback_only",  # a local Ray study
    "tests/train/test_device.py::test_a_ray_task_holding_a_gpu",  # a local Ray instance
    "tests/train/test_recipe.py::test_two_zero3_ranks",  # two torchrun ranks
    "tests/test_readme_commands.py::test_every_readme_command_runs",  # the README's studies on local Ray instances
    "tests/study/test_progress.py::test_on_a_terminal",  # a local Ray study in tmux
    "tests/study/test_study_replay.py",  # a local Ray study of 12 replayed trials
    "tests/study/test_study_moasha.py",  # a local Ray study
)
FLOORS = "tests/train/test_floors.py"  # the floors: three 10-epoch trainings on one thread (~2 min)

# The whole suite runs on two pytest-xdist workers (pyproject: `--dist loadgroup`, in the order below).
# - serial: the tests on the session's cluster, one after another on one worker; beside each other
#   their studies slowed each other several-fold.
# - the other worker meanwhile runs what needs no tiny workspace (while the serial worker builds
#   it), then the slow tests off the cluster (local Ray instances, each trial on one thread), the
#   floors (one thread), then the rest.
SERIAL_GROUP, LOCAL_GROUP = "serial", "local"


def _group(item) -> str | None:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return SERIAL_GROUP
    if item.nodeid.startswith(FLOORS):
        return "floors"
    return LOCAL_GROUP if item.nodeid.startswith(SLOW_TESTS) else None


def _turn(item) -> int:
    group = _group(item)
    if group == SERIAL_GROUP:
        return 0
    if group is None:
        return 4 if "tiny_workspace" in getattr(item, "fixturenames", ()) else 1
    return 2 if group == LOCAL_GROUP else 3


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the group marks
def pytest_collection_modifyitems(items):
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_turn)


def _shared_home(tmp_path_factory, worker_id) -> Path:
    """The run's QSTUDY_HOME, one for all pytest-xdist workers: ``$QSTUDY_TEST_CACHE`` when set."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    return Path(os.environ.get("QSTUDY_TEST_CACHE") or shared / "qstudy_home")


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, worker_id) -> Path:
    """QSTUDY_HOME with target-domain clips and the cached tiny base, built once per test run.

    Reuses ``$QSTUDY_TEST_CACHE`` across sessions when set (local runs); CI builds it fresh. The
    run's pytest-xdist workers share one: the first builds it, the others wait for it.
    """
    from filelock import FileLock

    from qstudy.cli import prepare_tiny_workspace

    home = _shared_home(tmp_path_factory, worker_id)
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
