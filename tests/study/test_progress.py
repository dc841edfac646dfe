"""What a running study shows: one live table redrawn in place on a terminal, one line per trial event elsewhere.

The terminal is a real one: `qstudy study` runs inside a tmux session of a fixed size, on a
local Ray instance with the embedded MLflow store and a fresh HOME (so Ray generates its
token as on a new machine), and the pane is read with `tmux capture-pane`. A piped study's
lines are checked where a local study runs piped anyway (test_study_network.py).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from servers import BIN, tiny_space

from qstudy.study.progress import EVENT_LINE, TrialRow, event_line, front_marks
from qstudy.study.trial import INFEASIBLE_KEY, OUT_OF_MEMORY_KEY
from qstudy.study.storage import StudyStorage

pytestmark = pytest.mark.timeout(600)

HEADER = re.compile(r"\btrial\s+.*\barm\s+.*\bconfig\s+.*\bepoch\s+.*\bCIDEr\s+.*\bparams\s+.*\bstate\s+.*\bfront\b")
# What the libraries print unless -v: MLflow creating its sqlite store, Ray's token notices, DeepSpeed's accelerator.
NOISE = ("Creating initial MLflow database tables", "Updating database tables", "INFO", "Token authentication",
         "authentication token", "Setting accelerator to CPU", "== Status ==", "Logical resource usage",
         "Traceback")


def _row(trial_id: str, cider: float | None, params: int, epoch: int | None = 2, state: str = "finished"):
    return TrialRow(trial_id=trial_id, arm="qadapter", config="K=8 r=4", epochs=2, epoch=epoch, cider=cider,
                    params=params, state=state)


def test_the_front_marks_running_and_finished_trials_and_its_knee():
    rows = [_row("cheap", 1.0, 1_000), _row("knee", 2.9, 2_000, epoch=1, state="running"),
            _row("big", 3.0, 100_000), _row("dominated", 0.5, 5_000),
            _row("failed", 9.0, 10, state="failed"), _row("infeasible", 0.0, 1, state="infeasible"),
            _row("out of memory", 9.0, 1, epoch=1, state="out of memory"),
            _row("stopped early", 5.0, 10, epoch=1, state="stopped"),
            _row("no result yet", None, 1, epoch=None, state="running")]
    assert front_marks(rows) == {"cheap": "*", "knee": "knee", "big": "*"}


@pytest.mark.parametrize("event, expected", [
    ("started", "trial t1 (qadapter) started: K=8 r=4"),
    ("epoch", "trial t1 (qadapter) epoch 2/2: CIDEr 1.2346, params 12,345"),
    ("finished", "trial t1 (qadapter) finished: CIDEr 1.2346, params 12,345, 2/2 epochs"),
    ("stopped", "trial t1 (qadapter) stopped: CIDEr 1.2346, params 12,345, 2/2 epochs"),
    ("infeasible", "trial t1 (qadapter) infeasible: params 12,345 over the parameter budget"),
    ("out of memory", "trial t1 (qadapter) out of memory: RuntimeError: DefaultCPUAllocator: can't allocate memory; "
                      "params 12,345, 2/2 epochs"),
])
def test_event_lines_have_the_documented_format(event, expected):
    row = _row("t1", 1.23456, 12_345)
    row.reason = "RuntimeError: DefaultCPUAllocator: can't allocate memory"
    line = event_line(row, event)
    assert line == expected and EVENT_LINE.match(line)


@pytest.mark.parametrize("key, state", [(INFEASIBLE_KEY, "infeasible"), (OUT_OF_MEMORY_KEY, "out of memory")])
def test_a_trial_that_ends_untrained_keeps_its_state_past_its_epochs(key, state):
    row = _row("t1", None, 10, epoch=None, state="running")
    row.take({"epoch": 0, "cider": 0.5, "trainable_params": 10})  # out of memory in its second epoch
    row.take({"cider": 0.0, "trainable_params": 10, key: True})  # trial.py's untrained_report
    assert (row.state, row.ended(), row.epoch_text) == (state, state, "1/2")


def test_epochs_count_from_one_and_a_trial_that_ends_early_is_stopped():
    row = _row("t1", None, 10, epoch=None, state="running")
    row.take({"epoch": 0, "cider": 0.5, "trainable_params": 10})
    assert (row.epoch, row.cider, row.ended()) == (1, 0.5, "stopped")
    row.take({"epoch": 1, "cider": 0.7, "trainable_params": 10})
    assert (row.epoch_text, row.ended()) == ("2/2", "finished")


def _env(home: Path, fresh_home: Path, test_env: dict) -> dict:
    env = {key: value for key, value in test_env.items() if not key.startswith(("RAY_AUTH", "MLFLOW_LOGGING"))}
    return {**env, "QSTUDY_HOME": str(home), "HOME": str(fresh_home),
            "RAY_TMPDIR": tempfile.mkdtemp(prefix="qsprog", dir="/tmp")}  # Ray's socket paths must stay short


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_on_a_terminal_one_table_is_redrawn_in_place_and_the_summary_ends_with_the_next_commands(
        study_home, tmp_path, test_env):
    space = tiny_space(tmp_path, trials=2, concurrency=2, sampler="random", seed=1)
    env = _env(study_home, tmp_path / "user", test_env)
    script = tmp_path / "study.sh"
    script.write_text("".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items()
                              if key.isidentifier())
                      + f"{BIN / 'qstudy'} study {space} --name live; echo qstudy-exit=$?; sleep 600\n")
    socket = f"qstudy-progress-{time.monotonic_ns()}"  # a tmux server of its own
    _tmux(socket, "new-session", "-d", "-x", "150", "-y", "40", f"bash {script}")
    screens = []
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            screens.append(_tmux(socket, "capture-pane", "-p", "-J"))
            if "qstudy-exit=" in screens[-1]:
                break
            time.sleep(0.3)
        history = _tmux(socket, "capture-pane", "-p", "-J", "-S", "-")  # with the scrollback: all it printed
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
    print(history)  # shown when an assertion below fails
    assert "qstudy-exit=0" in history

    # One table: its header once on every screen and once in everything printed, each trial on one row of it.
    tables = [screen for screen in screens if HEADER.search(screen)]
    assert tables and all(len(HEADER.findall(screen)) == 1 for screen in tables)
    assert len(HEADER.findall(history)) == 1
    summary_at = re.search(r"^study live: .* in \d+ s$", history, re.M).start()
    table, summary = history[:summary_at], history[summary_at:]
    rows = [line for line in table.splitlines() if re.search(r"\bqadapter\b", line)]
    trial_ids = [row.split()[0] for row in rows]
    assert len(rows) == 2 and len(set(trial_ids)) == 2, rows
    # Redrawn at every epoch: a screen showed a trial after its first epoch, the last shows both after their last.
    assert any(re.search(r"\bqadapter\b.* 1/2 .*\brunning\b", screen) for screen in tables), tables
    assert all(re.search(r" 2/2 +\d\.\d{4} +[\d,]+ +finished\b", row) for row in rows), rows
    assert any(row.rstrip().endswith("knee") for row in rows), rows

    # The summary's front marks its knee, and it ends with the commands to run next.
    front = summary[summary.index("Pareto front"):summary.index("best CIDEr")].splitlines()
    assert any(line.rstrip().endswith("*") for line in front[3:]), front
    lines = summary[:summary.index("qstudy-exit=")].rstrip().splitlines()
    assert lines[-5] == "next:" and lines[-4].strip() == "qstudy report live", lines[-6:]
    assert lines[-1].strip().startswith("mlflow ui --backend-store-uri")
    for noise in NOISE:
        assert noise not in history, noise


def test_the_summary_marks_the_knee_of_its_front(tmp_path):
    from qstudy.analysis.pareto import analyse
    from qstudy.records import TrialRecord
    from qstudy.study.tuner import StudySummary, format_summary

    records = [TrialRecord(trial_id=trial_id, study="s", method="qadapter", params={}, cider=cider,
                           trainable_params=params, total_params=None, status="FINISHED", order=order)
               for order, (trial_id, cider, params) in enumerate([("cheap", 1.0, 1_000), ("knee", 2.9, 2_000),
                                                                  ("big", 3.0, 100_000)])]
    analysis = analyse(records)
    summary = StudySummary(name="s", study_dir=tmp_path, storage=StudyStorage(str(tmp_path), "s"),
                           tracking_uri="sqlite:///x.db", experiment="e",
                           parent_run_id="p", wall_seconds=1.0, records=records, front=list(analysis.front),
                           knee=analysis.knee, best=analysis.best)
    marked = [line.split()[0] for line in format_summary(summary).splitlines() if line.rstrip().endswith("*")]
    assert marked == ["knee"]
