"""What a study prints while it runs: Tune's status table when it has news, and one line per failed trial.

Tune's ``CLIReporter`` prints its table every ``max_report_frequency`` seconds whether or not
anything changed (~150 tables in a two-minute study), and names Ray's staging
directory in the session temp dir as the result directory. This one prints when a trial has
started, finished or failed (at most every ``max_report_frequency`` seconds, so trials that
change together share a table) and at the end, and names the study directory, where Tune's
experiment state, the trials' outputs and the Optuna study are. Tune's error table (and its
traceback per failure, see study/tuner.py) only with -v; by default a failed trial is one line:
its trial, arm, reason and the file with its full error. Imports no torch.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback, CLIReporter

from qstudy.core.errors import REASON_LIMIT, one_line

_RESULT_DIR_LINE = "Result logdir: "
_ERROR_TABLE_LINE = "Number of errored trials: "


class LiveTable(CLIReporter):
    """``CLIReporter`` without repeats; its "Result logdir" line names ``study_dir``; its error table only if ``show_errors``."""

    def __init__(self, study_dir: str, show_errors: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._study_dir = study_dir
        self._show_errors = show_errors
        self._shown: tuple = ()

    def should_report(self, trials, done: bool = False) -> bool:
        news = tuple((trial.trial_id, trial.status) for trial in trials)
        if done or (news != self._shown and time.time() - self._last_report_time >= self._max_report_freqency):
            self._shown = news
            self._last_report_time = time.time()
            return True
        return False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        lines = []
        for line in self._progress_str(trials, done, *sys_info).split("\n"):
            if line.startswith(_ERROR_TABLE_LINE) and not self._show_errors:
                break  # the error table is the table's last part
            lines.append(f"Study directory: {self._study_dir}" if line.startswith(_RESULT_DIR_LINE) else line)
        self._print("\n".join(lines).rstrip("\n"))


def reason(error: BaseException | None) -> str:
    """What a trial raised, as one line: the exception inside Ray's wrapper, its type and message."""
    if error is None:
        return "no error was recorded"
    cause = getattr(error, "cause", None) or error  # RayTaskError carries the trial's own exception
    return one_line(f"{type(cause).__name__}: {cause}", REASON_LIMIT)


def last_exception(traceback_text: str) -> str:
    """The ``Type: message`` a formatted traceback ends with, as one line."""
    lines = traceback_text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    rest = lines[starts[-1] + 1:] if starts else lines
    message = next((i for i, line in enumerate(rest) if not line.startswith(" ")), 0)
    return one_line("\n".join(rest[message:]), REASON_LIMIT)


class FailureLines(Callback):
    """One line per trial that failed for good (Tune retries first): trial, arm, reason, the file with its full error.

    A retried trial that had raised fails again at once saying so (study/worker.py); its line
    gives the reason it raised the first time, from the traceback the worker kept.
    """

    def __init__(self, outbox_root: str):
        self._outbox_root = Path(outbox_root)

    def on_trial_error(self, iteration: int, trials, trial, **info) -> None:
        from qstudy.study.worker import FAILED_MARKER, ApplicationFailure

        try:
            error = trial.get_pickled_error()
        except Exception:  # noqa: BLE001 - an error Ray could not pickle still gets its line
            error = None
        marker = self._outbox_root / trial.trial_id / FAILED_MARKER
        if isinstance(getattr(error, "cause", None) or error, ApplicationFailure) and marker.exists():
            why = last_exception(marker.read_text())
        else:
            why = reason(error)
        # Where the error file lands in the study's storage (Tune writes it to a staging dir first and copies it).
        log = Path(trial.path) / Path(trial.error_file).name
        print(f"trial {trial.trial_id} ({trial.config.get('method', '?')}) failed: {why}; full log: {log}", flush=True)
