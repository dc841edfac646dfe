"""MOASHA's promotion decisions, pinned on hand-made rung results (ties, asynchronous arrival)."""

from __future__ import annotations

import itertools
import json
import pickle
from types import SimpleNamespace

import numpy as np
from qstudy.study.scheduler import MultiObjectiveASHA, continues, crowding_distance, rank_order, rungs
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def test_rungs_leave_room_for_a_promotion():
    assert rungs(1, 3, 10) == [1, 3]  # not 9: a promotion from there would buy one epoch, not three-fold
    assert rungs(1, 3, 9) == [1, 3]
    assert rungs(2, 2, 10) == [2, 4]
    assert rungs(1, 3, 2) == []


def test_rank_order_fronts_then_crowding_then_arrival():
    results = [(1.0, 100), (2.0, 200), (0.5, 50), (1.5, 300), (1.0, 100), (2.0, 220)]
    # Front 0: (2.0, 200), (0.5, 50) at its ends (infinite crowding), (1.0, 100) inside it.
    # Then (2.0, 220) (front 1: only (2.0, 200) dominates it), then (1.5, 300) (front 2: (2.0, 220) does too),
    # then the repeat of (1.0, 100), after every distinct result.
    assert rank_order(results) == [1, 2, 0, 5, 3, 4]


def test_identical_results_share_crowding_and_repeats_rank_last():
    points = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, 0.0], [1.0, 0.5]])
    assert crowding_distance(points).tolist() == [np.inf, 2.0, np.inf, 2.0]
    assert rank_order([(3.0, 10), (3.0, 10), (3.0, 10)]) == [0, 1, 2]
    # A repeat of the cheap end of front 0 ranks after (1.0, 800), which is on front 1.
    assert rank_order([(0.5, 50), (2.0, 500), (1.0, 800), (0.5, 50)]) == [0, 1, 2, 3]


def test_repeats_of_an_extreme_point_do_not_shut_the_rung():
    """One cheap config sampled again and again (a pinned arm) must not crowd out new configs."""
    scheduler = MultiObjectiveASHA(1, 3, 10)
    decisions = []
    for i in range(12):
        decisions.append(_report(scheduler, f"frozen{i}", 1, 1.5, 25_000))
        decisions.append(_report(scheduler, f"new{i}", 1, 1.0 + 0.1 * i, 30_000 + 1_000 * i))
    assert decisions[0] == CONTINUE and CONTINUE not in decisions[2::2]  # repeats after the first stop
    assert decisions[1::2].count(CONTINUE) >= 4  # distinct configs still get their share


# One rung, eta = 3, in arrival order: (cider, params) and whether it continues. A newcomer is
# ranked among everything the rung has seen, itself included, and continues if in the top ceil(n / 3).
RUNG = [
    ((2.0, 500), True),    # n=1, keep 1: the first arrival always continues
    ((1.0, 800), False),   # n=2, keep 1: dominated by the first
    ((1.0, 100), False),   # n=3, keep 1: front 0 with the first, both its ends: the earlier arrival ranks first
    ((3.0, 900), True),    # n=4, keep 2: the new top end of front 0 (ends rank by arrival: (1.0, 100) then this)
    ((2.0, 500), False),   # n=5, keep 2: a tie with the first arrival; both inside the front now
    ((0.5, 50), True),     # n=6, keep 2: the new cheap end of the front, next after (3.0, 900)
    # n=7, keep 3: dominates both (2.0, 500). Front 0 is (0.5, 50) (1.0, 100) (2.5, 450) (3.0, 900); after
    # the two ends, the larger crowding distance: this one's (3.0-1.0)/2.5 + (900-100)/850 = 1.74 against
    # (1.0, 100)'s (2.5-0.5)/2.5 + (450-50)/850 = 1.27.
    ((2.5, 450), True),
]


def test_promotion_decisions_on_a_hand_made_rung():
    seen, decisions = [], []
    for result, _ in RUNG:
        seen.append(result)
        decisions.append(continues(seen, 3))
    assert decisions == [expected for _, expected in RUNG]


def _trial(trial_id: str):
    return SimpleNamespace(trial_id=trial_id)


def _report(scheduler, trial_id: str, epochs_done: int, cider: float, params: int) -> str:
    return scheduler.on_trial_result(None, _trial(trial_id), {"epoch": epochs_done - 1, "cider": cider,
                                                              "trainable_params": params})


def test_asynchronous_arrival_decides_on_arrival(tmp_path):
    """Trials interleave across rungs; none waits for a rung to fill, each is judged by what its rung had seen."""
    scheduler = MultiObjectiveASHA(grace_epochs=1, reduction_factor=3, epochs=10, state_path=str(tmp_path / "s.json"))
    assert scheduler.milestones == [1, 3]
    assert _report(scheduler, "a", 1, 2.0, 500) == CONTINUE   # rung 1: alone
    assert _report(scheduler, "b", 1, 1.0, 800) == STOP       # rung 1: dominated by a
    assert _report(scheduler, "a", 2, 2.1, 500) == CONTINUE   # no rung at 2 epochs
    assert _report(scheduler, "a", 3, 2.2, 500) == CONTINUE   # rung 3: alone, while rung 1 has seen two
    assert _report(scheduler, "c", 1, 0.5, 50) == STOP        # rung 1, n=3, keep 1: a and c end front 0, a came first
    assert _report(scheduler, "d", 1, 3.0, 100) == CONTINUE   # rung 1, n=4, keep 2: front 0 is c and d
    # a passed rung 1 on arrival; arriving now, behind d, it would not: decisions are never revisited.
    assert not continues([(2.0, 500), (1.0, 800), (0.5, 50), (3.0, 100), (2.0, 500)], 3)
    assert _report(scheduler, "d", 3, 2.9, 100) == CONTINUE   # rung 3, n=2, keep 1: d dominates a
    assert _report(scheduler, "e", 3, 1.0, 900) == STOP       # rung 3, n=3, keep 1
    assert _report(scheduler, "a", 9, 0.1, 500) == CONTINUE   # not a rung, however bad
    assert _report(scheduler, "a", 10, 2.5, 500) == CONTINUE  # the last epoch is never a rung
    assert scheduler.stopped == {"b": 1, "c": 1, "e": 3}
    # A result that closes no epoch (an infeasible trial's single report) passes untouched.
    assert scheduler.on_trial_result(None, _trial("f"), {"cider": 0.0, "trainable_params": 9}) == CONTINUE

    saved = json.loads((tmp_path / "s.json").read_text())
    assert [entry[0] for entry in saved["rungs"]["1"]] == ["a", "b", "c", "d"]
    assert [entry[0] for entry in saved["rungs"]["3"]] == ["a", "d", "e"]


def test_resumed_scheduler_keeps_its_rungs(tmp_path):
    state = str(tmp_path / "s.json")
    first = MultiObjectiveASHA(1, 3, 10, state_path=state)
    assert _report(first, "a", 1, 2.0, 500) == CONTINUE
    assert _report(first, "b", 1, 1.0, 800) == STOP
    # Ray restores the scheduler from a pickle (tuner.pkl): whenever it was taken, the file decides.
    resumed = pickle.loads(pickle.dumps(first))
    assert _report(first, "z", 3, 9.0, 1) == CONTINUE  # after the pickle: only the file carries it
    assert _report(resumed, "a", 1, 2.0, 500) == CONTINUE    # re-reported by a restored trial: passed before
    assert _report(resumed, "c", 1, 1.5, 900) == STOP        # n=3 with a and b remembered: keep 1
    assert resumed.stopped == {"b": 1, "c": 1}
    assert [entry[0] for entry in resumed._table()[3]] == ["z"]


class _Controller:
    """What Tune hands a scheduler (its trials, its searcher, ``stop_trial``), recording what the scheduler did."""

    def __init__(self, trials: list[Trial]):
        self.trials, self.completed, self.stopped = trials, [], []
        self.search_alg = SimpleNamespace(on_trial_complete=lambda trial_id, result: self.completed.append(
            (trial_id, result)))

    def get_trials(self) -> list[Trial]:
        return self.trials

    def stop_trial(self, trial: Trial) -> None:
        self.stopped.append(trial.trial_id)
        trial.set_status(Trial.TERMINATED)


def test_a_resumed_study_ends_a_trial_stopped_by_the_dead_driver_before_it_runs(tmp_path):
    """The driver stopped b at rung 1 and died before Tune saved b as ended: Tune resumes b as PENDING."""
    state = str(tmp_path / "s.json")
    first = MultiObjectiveASHA(1, 3, 10, state_path=state)
    assert _report(first, "a", 1, 2.0, 500) == CONTINUE
    assert first.on_trial_result(None, _trial("b"), {"epoch": 0, "cider": 1.0, "trainable_params": 800,
                                                     "val_bleu4": 0.25, "config/method": "lora"}) == STOP
    resumed = pickle.loads(pickle.dumps(first))
    a, b = (Trial("run_trial", trial_id=name, stub=True) for name in "ab")
    controller = _Controller([b, a])
    assert resumed.choose_trial_to_run(controller) is a  # b is not run again past its rung
    # The searcher gets b's rung result (to close it in Optuna and MLflow if the dead driver had not), Tune ends b.
    rung_result = {"epoch": 0, "cider": 1.0, "trainable_params": 800, "val_bleu4": 0.25, "done": True}
    assert controller.completed == [("b", rung_result)] and b.last_result.items() >= rung_result.items()
    assert controller.stopped == ["b"] and b.status == Trial.TERMINATED
    assert resumed.choose_trial_to_run(controller) is a and controller.stopped == ["b"]


def test_whatever_the_arrival_order_dominance_decides_the_extremes():
    best, worst = (3.0, 50), (0.5, 900)  # best dominates every other result, worst is dominated by all
    results = [(2.0, 500), (1.0, 800), best, (0.5, 100), worst]
    for order in itertools.permutations(results):
        scheduler = MultiObjectiveASHA(1, 3, 10)
        decisions = {result: _report(scheduler, f"t{i}", 1, *result) for i, result in enumerate(order)}
        assert decisions[order[0]] == CONTINUE
        assert decisions[best] == CONTINUE
        assert decisions[worst] == (CONTINUE if order[0] == worst else STOP)
