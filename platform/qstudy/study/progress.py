"""What a study prints while it runs: one live table on a terminal, one line per trial event anywhere else.

Tune's own reporter reprints its whole status table (headers, resources, scheduler) whenever a
trial starts or ends, and shows nothing of the epochs between. This module replaces it with a
Tune callback that sees every trial event in the driver:

- On a terminal, one table redrawn in place at every event, every epoch of every trial
  included: trial, arm, the searched values, epoch/epochs (counted from 1), the latest val
  CIDEr, trainable parameters, state, and whether the trial is on the current Pareto front
  of CIDEr (running trials at their latest epoch) against trainable parameters (``knee``: the
  front's knee, as ``qstudy report`` picks it).
- Anywhere else (CI, ``ray job logs``, a pipe), one line per event, in this format::

      trial ID (ARM) started: SEARCHED VALUES
      trial ID (ARM) epoch E/N: CIDEr 1.2345, loss 2.3456, params 12,345
      trial ID (ARM) finished: CIDEr 1.2345, params 12,345, N/N epochs
      trial ID (ARM) stopped: CIDEr 1.2345, params 12,345, E/N epochs
      trial ID (ARM) infeasible: params 12,345 over the parameter budget
      trial ID (ARM) out of memory: REASON; params 12,345, E/N epochs
      trial ID (ARM) failed: REASON; full log: PATH

  ``stopped``: the study's scheduler ended it early. ``out of memory``: the allocation that
  failed, and the epochs completed before. A failed trial gets its ``failed`` line on a
  terminal too, above the table: Tune's error table and tracebacks only with -v. Every line
  matches :data:`EVENT_LINE`.

Imports no torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback
from ray.tune.experiment import Trial

from qstudy.analysis.pareto import knee_point, pareto_front
from qstudy.core.errors import REASON_LIMIT, last_exception, one_line
from qstudy.records import TrialRecord
from qstudy.study.space import SampledConfig
from qstudy.study.trial import INFEASIBLE_KEY, OUT_OF_MEMORY_KEY
from qstudy.study.storage import FAILED_MARKER, StudyStorage
from qstudy.study.worker import ApplicationFailure, out_of_memory_reason
from qstudy.tracking.schema import FINISHED

EVENT_LINE = re.compile(r"^trial (?P<trial>\S+) \((?P<arm>\S+)\) "
                        r"(?P<event>started|epoch (?P<epoch>\d+)/(?P<epochs>\d+)|finished|stopped|infeasible"
                        r"|out of memory|failed): (?P<detail>.*)$")

(PENDING, RUNNING, RESTARTING, FINISHED_STATE, STOPPED_STATE, INFEASIBLE_STATE, OUT_OF_MEMORY_STATE,
 FAILED_STATE) = ("pending", "running", "restarting", "finished", "stopped", "infeasible", "out of memory", "failed")
# The states of a trial's single report that ends it untrained (trial.py's untrained_report).
_UNTRAINED = {INFEASIBLE_KEY: INFEASIBLE_STATE, OUT_OF_MEMORY_KEY: OUT_OF_MEMORY_STATE}
# No trade-off point: a stopped trial's CIDEr is a low-fidelity one (the summary leaves it off the front too).
_OFF_FRONT = (STOPPED_STATE, FAILED_STATE, INFEASIBLE_STATE, OUT_OF_MEMORY_STATE)
_TABLE_CHROME = 8  # lines the live view needs besides its rows: title, header, borders, caption, a spare


@dataclass
class TrialRow:
    """One trial as the live table and the event lines show it."""

    trial_id: str
    arm: str
    config: str  # the searched values, compact (TrialRecord.config)
    epochs: int  # planned
    epoch: int | None = None  # completed, counted from 1
    cider: float | None = None  # the latest epoch's val CIDEr
    params: int | None = None
    state: str = PENDING
    order: int = 0
    reason: str | None = None  # the allocation an out-of-memory trial could not make

    @classmethod
    def of(cls, trial, order: int) -> "TrialRow":
        sampled = SampledConfig.from_tune_config(trial.config)
        record = TrialRecord(trial_id=trial.trial_id, study="", method=sampled.method, params=sampled.values,
                             cider=None, trainable_params=None, total_params=None, status="")
        return cls(trial_id=trial.trial_id, arm=sampled.method, config=record.config,
                   epochs=sampled.run_config.train.epochs, params=sampled.trainable_params, order=order)

    def take(self, result: dict) -> None:
        """Read a result Tune received: an epoch's metrics, or the one report of a trial that ended untrained."""
        untrained = [state for key, state in _UNTRAINED.items() if result.get(key)]
        if untrained:
            self.state = untrained[0]
            return
        if "epoch" in result:
            self.epoch = int(result["epoch"]) + 1  # the recipe counts epochs from 0
        if "cider" in result:
            self.cider = float(result["cider"])
        if "trainable_params" in result:
            self.params = int(result["trainable_params"])

    def ended(self) -> str:
        """The state of a trial Tune completed: infeasible, out of memory, finished all its epochs, or stopped early."""
        if self.state in _UNTRAINED.values():
            return self.state
        return FINISHED_STATE if self.epoch is not None and self.epoch >= self.epochs else STOPPED_STATE

    @property
    def epoch_text(self) -> str:
        return f"{self.epoch or 0}/{self.epochs}"

    @property
    def params_text(self) -> str:
        return "-" if self.params is None else f"{self.params:,}"

    @property
    def cider_text(self) -> str:
        return "-" if self.cider is None else f"{self.cider:.4f}"

    def record(self) -> TrialRecord:
        """The row as a valid record when it has a trade-off point: what the front is computed on."""
        status = FINISHED if self.cider is not None and self.state not in _OFF_FRONT else self.state
        return TrialRecord(trial_id=self.trial_id, study="", method=self.arm, params={}, cider=self.cider,
                           trainable_params=self.params, total_params=None, status=status, order=self.order)


def front_marks(rows: list[TrialRow]) -> dict[str, str]:
    """``{trial id: "*" or "knee"}`` for the rows on the current Pareto front (analysis/pareto.py's front and knee)."""
    front = pareto_front(row.record() for row in rows)
    knee = knee_point(front)
    return {record.trial_id: "knee" if record == knee else "*" for record in front}


def event_line(row: TrialRow, event: str) -> str:
    """The plain line for ``event`` (``started``, ``epoch``, or a row's end state) of ``row``."""
    if event == "started":
        detail = row.config or "-"
    elif event == "epoch":
        event = f"epoch {row.epoch_text}"
        detail = f"CIDEr {row.cider_text}, params {row.params_text}"
    elif event == INFEASIBLE_STATE:
        detail = f"params {row.params_text} over the parameter budget"
    elif event == OUT_OF_MEMORY_STATE:
        detail = f"{row.reason or 'no error was recorded'}; params {row.params_text}, {row.epoch_text} epochs"
    else:
        detail = f"CIDEr {row.cider_text}, params {row.params_text}, {row.epoch_text} epochs"
    return f"trial {row.trial_id} ({row.arm}) {event}: {detail}"


def reason(error: BaseException | None) -> str:
    """What a trial raised, as one line: the exception inside Ray's wrapper, its type and message."""
    if error is None:
        return "no error was recorded"
    cause = getattr(error, "cause", None) or error  # RayTaskError carries the trial's own exception
    return one_line(f"{type(cause).__name__}: {cause}", REASON_LIMIT)


def failure_line(trial, storage: StudyStorage) -> str:
    """A trial that failed for good (Tune retries first): trial, arm, reason, the file with its full error.

    A retried trial that had raised fails again at once saying so (study/worker.py); its line
    gives the reason it raised the first time, from the traceback the worker kept.
    """
    try:
        error = trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - an error Ray could not pickle still gets its line
        error = None
    first = storage.read_text(storage.trial_file(trial.trial_id, FAILED_MARKER))
    if isinstance(getattr(error, "cause", None) or error, ApplicationFailure) and first is not None:
        why = last_exception(first)
    else:
        why = reason(error)
    # Where the error file lands in the study's storage (Tune writes it to a staging dir first and copies it).
    log = storage.where("tune", Path(trial.path).name, Path(trial.error_file).name)
    return f"trial {trial.trial_id} ({trial.config.get('method', '?')}) failed: {why}; full log: {log}"


class StudyProgress(Callback):
    """Tune callback: the live table on a terminal, event lines elsewhere (the module docstring has both).

    Tune pickles its callbacks with the experiment (``--resume`` restores them), so only the
    study's names live in the pickled state; what is shown is rebuilt from Tune's trials.
    """

    def __init__(self, study: str, study_dir: str, storage: StudyStorage, trials: int):
        self._study, self._study_dir, self._storage, self._trials = study, study_dir, storage, trials
        self._reset()

    def _reset(self) -> None:
        self._rows: dict[str, TrialRow] = {}
        self._live = None
        self._moved: list[tuple[logging.StreamHandler, object]] = []
        self._restored = False
        self._started = time.monotonic()

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key in
                ("_study", "_study_dir", "_storage", "_trials")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # Tune's hooks, in the driver

    def setup(self, **info) -> None:
        self._started = time.monotonic()
        print(f"Study directory: {self._study_dir}", flush=True)
        console = _terminal()
        if console is not None:
            from rich.live import Live

            # Output printed while it shows (a failed trial's line, a warning) goes above the table.
            self._terminal_fd = sys.stdout.fileno()
            self._live = Live(console=console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            self._moved = _point_log_handlers(sys.stdout, sys.stderr)
            self._refresh()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if not self._restored:  # a resumed study starts with the trials that ended before: show them
            self._restored = True
            for trial in trials:
                if trial.status in (Trial.TERMINATED, Trial.ERROR):
                    self._row(trial)
            self._refresh()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        row.state = RUNNING
        self._event(row, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = self._row(trial)
        row.take(result)
        if row.state not in _UNTRAINED.values():
            row.state = RUNNING
            self._event(row, "epoch")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        row.state = row.ended()
        if row.state == OUT_OF_MEMORY_STATE:
            row.reason = out_of_memory_reason(self._storage, trial.trial_id)
        self._event(row, row.state)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._row(trial).state = RESTARTING
        self._refresh()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._row(trial).state = FAILED_STATE
        print(failure_line(trial, self._storage), flush=True)
        self._refresh()

    def on_experiment_end(self, trials, **info) -> None:
        if self._live is not None:
            for handler, stream in self._moved:
                handler.setStream(stream)
            self._live.stop()
            self._live = None

    # What is shown

    def _row(self, trial) -> TrialRow:
        if trial.trial_id not in self._rows:
            row = TrialRow.of(trial, len(self._rows))
            row.take(trial.last_result or {})
            # A trial restored by --resume that Tune already ended announces nothing: read its state.
            if trial.status == Trial.TERMINATED:
                row.state = row.ended()
            elif trial.status == Trial.ERROR:
                row.state = FAILED_STATE
            self._rows[trial.trial_id] = row
        return self._rows[trial.trial_id]

    def _event(self, row: TrialRow, event: str) -> None:
        if self._live is None:
            print(event_line(row, event), flush=True)
        else:
            self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            console = self._live.console
            try:  # rich asks stdin first, and a study's stdin need not be the terminal it draws on
                console.size = os.get_terminal_size(self._terminal_fd)
            except OSError:
                pass
            self._live.update(self._table(console.height), refresh=True)

    def _table(self, height: int):
        from rich import box
        from rich.table import Table

        rows = list(self._rows.values())
        marks = front_marks(rows)
        shown = _fit(rows, marks, max(height - _TABLE_CHROME, 1))
        counts = {state: sum(row.state == state for row in rows) for state in
                  (RUNNING, FINISHED_STATE, STOPPED_STATE, INFEASIBLE_STATE, OUT_OF_MEMORY_STATE, FAILED_STATE)}
        counts[PENDING] = max(self._trials - len(rows), 0) + sum(row.state in (PENDING, RESTARTING) for row in rows)
        elapsed = int(time.monotonic() - self._started)
        table = Table(title=f"study {self._study}: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)
                      + f" of {self._trials} trials, {elapsed // 60}:{elapsed % 60:02d} elapsed",
                      title_justify="left", caption=_hidden(len(rows) - len(shown)), caption_justify="left",
                      box=box.SIMPLE_HEAD)
        for name, justify in (("trial", "left"), ("arm", "left"), ("config", "left"), ("epoch", "right"),
                              ("CIDEr", "right"), ("params", "right"), ("state", "left"), ("front", "left")):
            table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
        for row in shown:
            table.add_row(row.trial_id, row.arm, row.config or "-", row.epoch_text, row.cider_text, row.params_text,
                          row.state, marks.get(row.trial_id, ""))
        return table


def _fit(rows: list[TrialRow], marks: dict[str, str], room: int) -> list[TrialRow]:
    """The rows that fit ``room`` lines: running and front trials first, then the latest; in trial order."""
    if len(rows) <= room:
        return rows
    keep = sorted(rows, key=lambda row: (row.state != RUNNING, row.trial_id not in marks, -row.order))[:room]
    return sorted(keep, key=lambda row: row.order)


def _hidden(count: int) -> str | None:
    return f"{count} more trials not shown (ended, off the front first)" if count else None


def _point_log_handlers(stdout, stderr) -> list[tuple[logging.StreamHandler, object]]:
    """Point the log handlers that write to the process's own stdout or stderr at ``stdout`` and ``stderr``.

    Ray's and Optuna's handlers keep the stream they were made with, so a warning would bypass
    the live display and tear the table; this returns each moved handler with its old stream.
    """
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    handlers = {id(handler): handler for logger in loggers for handler in logger.handlers
                if type(handler) is logging.StreamHandler}
    targets = {id(sys.__stdout__): stdout, id(sys.__stderr__): stderr}
    return [(handler, handler.setStream(targets[id(handler.stream)])) for handler in handlers.values()
            if id(handler.stream) in targets]


def _terminal():
    """A rich console on this process's stdout when that is an interactive terminal, else None."""
    if not sys.stdout.isatty():
        return None
    from rich.console import Console

    console = Console(file=sys.stdout)
    return console if console.is_terminal and not console.is_dumb_terminal else None
