"""A real MLflow sqlite store holding two hand-made studies, written with the study engine's own tracking code."""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import pytest

from qstudy.study import tracking

TOTAL = 120_000_000


@dataclass(frozen=True)
class Trial:
    """What one trial logs, as the study engine's trial driver and worker log it."""

    trial_id: str
    method: str
    hyper: dict  # dotted run-config keys, as the sampler names them
    cider: float | None
    trainable: int
    status: str = tracking.FINISHED
    epochs: tuple[float, ...] = ()
    relogged_epochs: dict = field(default_factory=dict)  # {epoch: value} logged again, as a restarted trial does


QADAPTER = "qadapter"
# Finished in this order (the list order is creation order; FINISH_ORDER shuffles the ends).
MAIN_TRIALS = [
    Trial("t0", "frozen", {}, 0.21, 600_000, epochs=(0.15, 0.19, 0.21)),
    Trial(
        "t1",
        QADAPTER,
        {
            "adapter.num_query_tokens": 8,
            "adapter.insertion_layers": "last:2",
            "adapter.gating": "tanh",
            "adapter.rank": 16,
            "train.learning_rate": 1e-3,
        },
        0.34,
        650_000,
        epochs=(0.25, 0.31, 0.34),
        relogged_epochs={1: 0.30},
    ),
    Trial(
        "t2",
        QADAPTER,
        {
            "adapter.num_query_tokens": 16,
            "adapter.insertion_layers": [2, 3],
            "adapter.gating": "sigmoid",
            "adapter.rank": 32,
            "train.learning_rate": 1e-3,
        },
        0.38,
        900_000,
        epochs=(0.27, 0.35, 0.38),
    ),
    Trial(
        "t3",
        QADAPTER,
        {
            "adapter.num_query_tokens": 8,
            "adapter.insertion_layers": "all",
            "adapter.gating": "none",
            "adapter.rank": 8,
            "train.learning_rate": 1e-5,
        },
        0.30,
        1_200_000,
        epochs=(0.2, 0.25, 0.30),
    ),
    Trial(
        "t4",
        "lora",
        {"adapter.rank": 8, "adapter.alpha": 16.0, "adapter.target": "vision", "train.learning_rate": 3e-4},
        0.33,
        2_000_000,
        epochs=(0.3, 0.32, 0.33),
    ),
    Trial(
        "t5",
        "lora",
        {"adapter.rank": 32, "adapter.alpha": 64.0, "adapter.target": "both", "train.learning_rate": 3e-4},
        0.41,
        8_000_000,
        epochs=(0.30, 0.38, 0.41),
    ),
    Trial(
        "t6",
        "lora",
        {"adapter.rank": 64, "adapter.alpha": 16.0, "adapter.target": "lm", "train.learning_rate": 3e-4},
        None,
        16_000_000,
        status=tracking.FAILED,
        epochs=(0.1,),
    ),
    Trial(
        "t7",
        QADAPTER,
        {
            "adapter.num_query_tokens": 32,
            "adapter.insertion_layers": "all",
            "adapter.gating": "tanh",
            "adapter.rank": 64,
            "train.learning_rate": 1e-3,
        },
        None,
        90_000_000,
        status=tracking.INFEASIBLE,
    ),
]
FINISH_ORDER = ["t1", "t0", "t3", "t2", "t6", "t4", "t7", "t5"]
BASELINE_TRIALS = [
    Trial("b0", "full", {"train.learning_rate": 1e-5}, 0.43, TOTAL, epochs=(0.33, 0.40, 0.43)),
    Trial(
        "b1",
        "lora",
        {"adapter.rank": 4, "adapter.alpha": 8.0, "adapter.target": "lm", "train.learning_rate": 3e-4},
        0.36,
        650_000,
        epochs=(0.3, 0.34, 0.36),
    ),
]


def start_study(uri: str, family: str, study: str, root) -> tracking.TrialTarget:
    """A parent run as the study driver opens it; artifacts under ``root`` (MLflow's default is ./mlruns)."""
    experiment_id = tracking.ensure_experiment(uri, family, root / "artifacts")
    parent = tracking.start_study_run(uri, experiment_id, study, {"sampler": "tpe", "trials": 8})
    return tracking.TrialTarget(uri, experiment_id, parent, study, str(root / "outbox" / study))


def begin_trial(target: tracking.TrialTarget, trial: Trial) -> tracking.TrialTracker:
    """What the trial driver logs before training (run_trial), then the per-epoch metrics (worker)."""
    tracker = tracking.TrialTracker(target, trial.trial_id, f"{trial.method}-{trial.trial_id}")
    tracker.set_tags({"qstudy.method": trial.method, "qstudy.tune_trial": trial.trial_id})
    tracker.log_params(
        {
            "method": trial.method,
            **trial.hyper,
            "over_budget": trial.status == tracking.INFEASIBLE,
            "workers": 1,
            "deepspeed": False,
            "zero_stage": 0,
        }
    )
    tracker.log_metrics({"trainable_params": trial.trainable, "total_params": TOTAL})
    for epoch, value in enumerate(trial.epochs):
        tracker.log_metrics({"val_cider": value, "loss": 1.0 / (epoch + 1)}, step=epoch)
    for epoch, value in trial.relogged_epochs.items():  # the restart's first report re-logs an epoch
        tracker.log_metrics({"val_cider": value}, step=epoch)
    return tracker


def end_trial(tracker: tracking.TrialTracker, trial: Trial) -> None:
    if trial.status == tracking.FINISHED:
        tracker.log_metrics(
            {"cider": trial.cider, "trainable_params": trial.trainable, "total_params": TOTAL},
            step=max(len(trial.epochs) - 1, 0),
        )
    tracker.finish(trial.status)
    # MLflow end times are in milliseconds: the next trial ends in a later one, so completion order is unambiguous.
    ended = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 <= ended:
        pass


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """``(uri, {study: parent_run_id})``: "unit-study" (8 trials) and "unit-baselines" (2), interleaved in time,
    a study with no trials ("empty"), and two parent runs sharing one name ("twice": a list of ids)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    main = start_study(uri, "unit-family", "unit-study", root)
    baselines = start_study(uri, "unit-baselines-family", "unit-baselines", root)
    trackers = {trial.trial_id: (begin_trial(main, trial), trial) for trial in MAIN_TRIALS}
    baseline_trackers = [(begin_trial(baselines, trial), trial) for trial in BASELINE_TRIALS]
    for position, trial_id in enumerate(FINISH_ORDER):
        end_trial(*trackers[trial_id])
        if position in (0, 5):  # the baselines finish among the main study's trials
            end_trial(*baseline_trackers[0 if position == 0 else 1])
    empty = tracking.start_study_run(uri, main.experiment_id, "empty", {})
    twice = [tracking.start_study_run(uri, main.experiment_id, "twice", {}) for _ in range(2)]
    return uri, {
        "unit-study": main.parent_run_id,
        "unit-baselines": baselines.parent_run_id,
        "empty": empty,
        "twice": twice,
    }


@pytest.fixture(scope="session")
def main_trials():
    return {trial.trial_id: trial for trial in MAIN_TRIALS}


@pytest.fixture(scope="session")
def finish_order():
    return FINISH_ORDER


@pytest.fixture(scope="session")
def study_logging():
    """The helpers above, for tests that log their own trials the way the study engine does."""
    return types.SimpleNamespace(start_study=start_study, begin_trial=begin_trial, end_trial=end_trial, Trial=Trial)
