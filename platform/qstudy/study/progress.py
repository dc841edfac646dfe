"""The live trial table a study prints: Tune's status table, printed when it has news, pointing at the study directory.

Tune's ``CLIReporter`` prints its table every ``max_report_frequency`` seconds whether or not
anything changed (~150 tables in a two-minute study), and names Ray's staging
directory in the session temp dir as the result directory. This one prints when a trial has
started, finished or failed (at most every ``max_report_frequency`` seconds, so trials that
change together share a table) and at the end, and names the study directory, where Tune's
experiment state, the trials' outputs and the Optuna study are. Imports no torch.
"""

from __future__ import annotations

import time

from ray.tune import CLIReporter

_RESULT_DIR_LINE = "Result logdir: "


class LiveTable(CLIReporter):
    """``CLIReporter`` without repeats; its "Result logdir" line names ``study_dir``."""

    def __init__(self, study_dir: str, **kwargs):
        super().__init__(**kwargs)
        self._study_dir = study_dir
        self._shown: tuple = ()

    def should_report(self, trials, done: bool = False) -> bool:
        news = tuple((trial.trial_id, trial.status) for trial in trials)
        if done or (news != self._shown and time.time() - self._last_report_time >= self._max_report_freqency):
            self._shown = news
            self._last_report_time = time.time()
            return True
        return False

    def report(self, trials, done: bool, *sys_info: str) -> None:
        lines = self._progress_str(trials, done, *sys_info).split("\n")
        self._print("\n".join(f"Study directory: {self._study_dir}" if line.startswith(_RESULT_DIR_LINE) else line
                              for line in lines))
