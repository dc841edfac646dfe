"""Multi-objective asynchronous successive halving (MOASHA) for Ray Tune: stop trials that fall behind on (CIDEr, size) at a rung.

Ray Tune's own schedulers rank trials by one metric; this one ranks them on both study
objectives, as syne-tune's MOASHA does (Schmucker et al., arXiv 2106.12639). Rungs sit at
``grace_epochs * reduction_factor**k`` completed epochs while a promotion from them still buys
a further ``reduction_factor``-fold of training within ``train.epochs`` (with 10 epochs and
eta 3: rungs 1 and 3, not 9, where stopping two trials of three would throw away 18 epochs
of nearly finished training to save 2). When a
trial completes a rung's epochs its (CIDEr at that epoch, trainable parameters) joins the
rung's table, and it continues only if it ranks in the top ``ceil(n / reduction_factor)`` of
the ``n`` trials the rung has seen so far, itself included. Decisions are taken on arrival and
never revisited (asynchronous: no rung waits to fill), so the first arrival always continues
and with ``n`` below ``reduction_factor`` only the best one does, as in Ray's ASHA.

The ranking is non-dominated sorting (CIDEr max, parameters min), then, inside a front,
NSGA-II's crowding distance (larger first: the extremes and sparse regions of the front are
kept), then arrival order; a result identical to an earlier one ranks after every distinct one. The fronts
are :func:`qstudy.analysis.pareto.front_ranks`, the same sorting the study's Pareto analysis uses.

The rungs are written to ``state_path`` after every change: Ray pickles a scheduler only as
it was when the ``Tuner`` was built, so a resumed study reads them back from there. The first
stop is the one that counts: a driver killed after stopping a trial, but before Tune saved the
trial as ended, leaves it to be resumed from its checkpoint. The resumed scheduler ends it
before it trains past its rung, and hands the searcher the result it was stopped on, so Optuna
and MLflow close it at that rung whether or not the dead driver got to tell them. Imports no
torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from qstudy.analysis.pareto import front_ranks

EPOCH = "epoch"  # 0-based index of the epoch a result closes (study/worker.py's epoch_metrics)
CIDER, PARAMS = "cider", "trainable_params"


def rungs(grace_epochs: int, reduction_factor: int, epochs: int) -> list[int]:
    """Completed-epoch counts at which trials are compared: ``r, r*eta, ...`` while ``rung * eta <= epochs``."""
    milestones, milestone = [], grace_epochs
    while milestone * reduction_factor <= epochs:
        milestones.append(milestone)
        milestone *= reduction_factor
    return milestones


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front (rows: points, columns: objectives).

    Each objective's gaps are divided by its span in the front (CIDEr and parameter counts
    differ by orders of magnitude). Identical points share one value (computed on the distinct
    points), so a duplicate is neither favoured nor penalised by where a sort put it.
    """
    distinct, inverse = np.unique(points, axis=0, return_inverse=True)
    distance = np.zeros(len(distinct))
    for column in distinct.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        if span == 0:  # every point ties here: this objective tells them apart nowhere
            continue
        distance[order[0]] = distance[order[-1]] = math.inf
        distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance[inverse.reshape(-1)]


def rank_order(results: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of ``(cider, trainable_params)`` results, best first (arrival order breaks the last ties).

    A result identical to an earlier one at the rung (the same config sampled again, or two
    configs that score and cost the same) ranks after every distinct result: it adds nothing
    to the front, and otherwise repeats of one extreme point, each with its infinite crowding
    distance, would fill the rung's top places and stop every new config.
    """
    if not results:
        return []
    losses = np.array([[-cider, params] for cider, params in results], dtype=float)  # both minimised
    fronts = front_ranks(losses)
    crowding = np.zeros(len(results))
    for front in np.unique(fronts):
        members = np.flatnonzero(fronts == front)
        crowding[members] = crowding_distance(losses[members])
    seen, repeat = set(), []
    for result in map(tuple, losses):
        repeat.append(result in seen)
        seen.add(result)
    return sorted(range(len(results)), key=lambda index: (repeat[index], fronts[index], -crowding[index], index))


def continues(results: Sequence[tuple[float, float]], reduction_factor: int) -> bool:
    """Whether the last of ``results`` (one rung's, in arrival order) is in the rung's top ``ceil(n / eta)``."""
    keep = math.ceil(len(results) / reduction_factor)
    return rank_order(results).index(len(results) - 1) < keep


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving whose rungs rank by non-dominated sorting on (CIDEr, trainable parameters)."""

    # Buffered results would reach a rung after the trial trained past it.
    _supports_buffered_results = False

    def __init__(self, grace_epochs: int, reduction_factor: int, epochs: int, state_path: str | None = None):
        super().__init__()
        self.reduction_factor = reduction_factor
        self.milestones = rungs(grace_epochs, reduction_factor, epochs)
        self.state_path = state_path
        # milestone -> [[trial_id, cider, trainable_params], ...] in arrival order
        self._rungs: dict[int, list[list]] | None = None
        self.stopped: dict[str, int] = {}  # trial id -> the milestone it was stopped at
        self.stop_results: dict[str, dict] = {}  # trial id -> the numbers of the result it was stopped on

    def __getstate__(self) -> dict:
        # A pickled copy (Tune's tuner.pkl) reads the rungs back from the state file when used,
        # never from a snapshot taken whenever it was pickled.
        state = self.__dict__.copy()
        if self.state_path:
            state.update(_rungs=None, stopped={}, stop_results={})
        return state

    def _table(self) -> dict[int, list[list]]:
        if self._rungs is None:
            self._rungs = {milestone: [] for milestone in self.milestones}
            if self.state_path and Path(self.state_path).exists():
                saved = json.loads(Path(self.state_path).read_text())
                self._rungs.update({int(k): v for k, v in saved["rungs"].items()})
                self.stopped, self.stop_results = saved["stopped"], saved["results"]
        return self._rungs

    def _save(self) -> None:
        if self.state_path:
            partial = Path(f"{self.state_path}.tmp")
            partial.write_text(json.dumps({"rungs": self._table(), "stopped": self.stopped,
                                              "results": self.stop_results}))
            partial.replace(self.state_path)  # a driver killed mid-write keeps the previous state

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if EPOCH not in result or CIDER not in result:  # e.g. an infeasible trial's single report
            return TrialScheduler.CONTINUE
        milestone = int(result[EPOCH]) + 1
        table = self._table()
        if milestone not in table:
            return TrialScheduler.CONTINUE
        rung = table[milestone]
        if any(entry[0] == trial.trial_id for entry in rung):
            return TrialScheduler.CONTINUE  # a resumed trial re-reporting a rung it passed before
        rung.append([trial.trial_id, float(result[CIDER]), float(result[PARAMS])])
        if not continues([(cider, params) for _, cider, params in rung], self.reduction_factor):
            self.stopped[trial.trial_id] = milestone
            self.stop_results[trial.trial_id] = {key: value for key, value in result.items()
                                                 if isinstance(value, (int, float)) and not key.startswith("config/")}
            self._save()
            return TrialScheduler.STOP
        self._save()
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller):
        self._table()
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING and trial.trial_id in self.stopped:  # stopped by a driver that died
                result = {**self.stop_results[trial.trial_id], "done": True}
                trial.update_last_result(dict(result))  # what Tune's callbacks (the live table) show for it
                tune_controller.search_alg.on_trial_complete(trial.trial_id, result=result)
                tune_controller.stop_trial(trial)  # the searcher's second completion is ignored
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        table = self._table()
        seen = ", ".join(f"{milestone} epochs: {len(table[milestone])}" for milestone in self.milestones)
        return f"MOASHA (eta {self.reduction_factor}): rungs {seen}; {len(self.stopped)} stopped"
