"""The study's Optuna searcher: Ray's two-objective ``OptunaSearch``, told PRUNED for a trial that ended before its last epoch.

Ray's ``OptunaSearch`` tells Optuna every trial that ends without an error as COMPLETE with
its last reported values. A trial the scheduler stopped at a rung would enter the study, and
its Pareto front, with a low-fidelity CIDEr. Here a trial whose last result closes an epoch
before the run's last is told PRUNED instead (Optuna's samplers and ``best_trials`` skip
it), with the epochs it completed as the user attribute ``stopped_at_epochs``, and its MLflow
run is closed as STOPPED at that rung. The test is on the result itself, not on which
scheduler stopped it, so it holds after ``--resume`` too. Imports no torch.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from qstudy.study.scheduler import EPOCH
from qstudy.tracking.writer import TrialTarget, mark_stopped

log = logging.getLogger(__name__)

STOPPED_AT_ATTR = "stopped_at_epochs"


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that keeps trials stopped early off the study's front (see the module docstring)."""

    def __init__(self, *args, epochs: int, target: TrialTarget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self.target = target  # None: no MLflow (the replay benchmark)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        completed = int(result[EPOCH]) + 1 if result and EPOCH in result else None
        if error or completed is None or completed >= self.epochs or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        trial = self._ot_trials[trial_id]
        trial.set_user_attr(STOPPED_AT_ATTR, completed)
        self._ot_study.tell(trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
        if self.target is not None:
            mark_stopped(self.target, trial_id, completed, result)
