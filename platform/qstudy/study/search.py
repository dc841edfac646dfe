"""The study's Optuna searcher and its samplers: Ray's two-objective ``OptunaSearch``, told PRUNED for a trial that ended
before its last epoch and infeasible for one that ran out of memory; the sampler a space names.

Each Optuna trial carries its Tune trial id (user attribute ``trial_id``), the id of its
MLflow run and directories. Ray's ``OptunaSearch`` tells Optuna every trial that ends without
an error as COMPLETE with its last reported values. A trial the scheduler stopped at a rung
would enter the study, and its Pareto front, with a low-fidelity CIDEr. Here a trial whose
last result closes an epoch before the run's last is told PRUNED instead (Optuna's samplers
and ``best_trials`` skip it), with the epochs it completed as the user attribute
``stopped_at_epochs``, and its MLflow run is closed as STOPPED at that rung. The test is on the result itself, not on which
scheduler stopped it, so it holds after ``--resume`` too. A trial Optuna has already ended is
not told again: a killed driver told it, then died before Tune saved the trial as ended, and
the resumed study ends the trial once more (the scheduler's first stop, or the finished
trial's recorded result, study/worker.py).

A trial that ran out of memory reports it once (``out_of_memory``, with the two objectives):
its Optuna trial gets the violated constraint ``out_of_memory`` before it is told complete, as
a config over the parameter budget gets ``parameter_budget`` when sampled, so the samplers
(TPE, NSGA-II) rank it below every feasible trial and sample away from its region, and
``best_trials`` leaves it out. Imports no torch.
"""

from __future__ import annotations

import logging
import threading

from optuna.samplers import NSGAIISampler
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from qstudy.study.scheduler import EPOCH
from qstudy.study.space import SearchSpace
from qstudy.study.trial import OUT_OF_MEMORY_KEY
from qstudy.tracking.writer import TrialTarget, mark_stopped

log = logging.getLogger(__name__)

STOPPED_AT_ATTR = "stopped_at_epochs"
TRIAL_ID_ATTR = "trial_id"  # the Tune trial id, which names the trial's MLflow run and directories
OUT_OF_MEMORY_CONSTRAINT = "out_of_memory"  # 1.0 (violated) on a trial that ran out of memory


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that keeps trials stopped early off the study's front (see the module docstring)."""

    def __init__(self, *args, epochs: int, target: TrialTarget | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self.target = target  # None: no MLflow (the replay benchmark)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:  # a trial the scheduler ended on resume, which Tune then stops
            return
        told = self._ended_in_optuna(trial_id)
        completed = int(result[EPOCH]) + 1 if result and EPOCH in result else None
        if error or completed is None or completed >= self.epochs:
            if told:
                self._completed_trials.add(trial_id)
                return
            if result and result.get(OUT_OF_MEMORY_KEY):
                self._ot_trials[trial_id].set_constraint(OUT_OF_MEMORY_CONSTRAINT, 1.0)
            super().on_trial_complete(trial_id, result, error)
            return
        if not told:
            trial = self._ot_trials[trial_id]
            trial.set_user_attr(STOPPED_AT_ATTR, completed)
            self._ot_study.tell(trial, state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
        if self.target is not None:  # closing an already STOPPED run again leaves it as it was
            mark_stopped(self.target, trial_id, completed, result)

    def _ended_in_optuna(self, trial_id: str) -> bool:
        number = self._ot_trials[trial_id].number
        ended = self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                   TrialState.FAIL))
        return any(trial.number == number for trial in ended)


# Sized for the studies a space runs (SpaceFile.trials defaults to 8), not Optuna's defaults,
# which assume hundreds of trials: TPE's 10 random start-up trials would leave an 8-trial study
# random throughout, so half of it explores at random and the model guides the other half.
TPE_STARTUP_TRIALS = 4
# NSGA-II samples its first generation at random and selects only from a complete one: its
# default generation of 50 would keep such a study random; at 8, every 8 trials are a generation.
NSGA2_POPULATION = 8


class PicklableNSGAII(NSGAIISampler):
    """Optuna's NSGA-II, picklable: Tune pickles the searcher into its experiment state, and Optuna's genetic samplers
    hold a thread lock, which pickle refuses. The copy gets a lock of its own."""

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_thread_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def make_sampler(space: SearchSpace):
    """The space's Optuna sampler; TPE and NSGA-II read the budget constraint from each trial, the budget sampler the
    space itself (study/budget.py)."""
    import optuna

    name, seed = space.settings.sampler, space.settings.seed
    if name == "budget":
        from qstudy.study.budget import BudgetSampler

        return BudgetSampler(space, seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return PicklableNSGAII(seed=seed, population_size=NSGA2_POPULATION)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True)
