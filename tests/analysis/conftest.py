"""A real MLflow sqlite store holding two hand-made studies, written with the study engine's own tracking code.

Names come from the schema and every call is the writer's: the parent run, a trial's tags and
params (:func:`~qstudy.tracking.schema.trial_params`, as the trial driver builds them), its
per-epoch reports (:meth:`~qstudy.tracking.writer.TrialTracker.log_epoch`, as the worker logs
them) and its close. Only training is left out.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import pytest

from qstudy.tracking import schema, writer

TOTAL = 120_000_000  # the base model's parameters; a trial's measured total adds its trainable ones


@dataclass(frozen=True)
class Trial:
    """What one trial logs, as the study engine's trial driver and worker log it."""

    trial_id: str
    method: str
    hyper: dict  # dotted run-config keys, as the sampler names them
    cider: float | None
    trainable: int
    status: str = schema.FINISHED
    epochs: tuple[float, ...] = ()
    relogged_epochs: dict = field(default_factory=dict)  # {epoch: value} logged again, as a restarted trial does

    @property
    def measured_total(self) -> int:
        """The trial model's parameters: the base, plus what an adapter method adds to it."""
        return TOTAL if self.method in ("frozen", "full") else TOTAL + self.trainable


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
        status=schema.FAILED,
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
        status=schema.INFEASIBLE,
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


def start_study(uri: str, family: str, study: str, root) -> writer.TrialTarget:
    """A parent run as the study driver opens it; artifacts under ``root`` (MLflow's default is ./mlruns)."""
    experiment_id = writer.ensure_experiment(uri, family, root / "artifacts")
    parent = writer.start_study_run(uri, experiment_id, study, {
        schema.SAMPLER_PARAM: "tpe", schema.TRIALS_PARAM: 8, schema.BASE_TOTAL_PARAM: TOTAL})
    return writer.TrialTarget(uri, experiment_id, parent, study, str(root / "outbox" / study))


def begin_trial(target: writer.TrialTarget, trial: Trial) -> writer.TrialTracker:
    """What the trial driver logs before training (run_trial), then the per-epoch reports (worker)."""
    tracker = writer.TrialTracker(target, trial.trial_id, f"{trial.method}-{trial.trial_id}")
    tracker.start()
    tracker.set_tags({schema.METHOD_TAG: trial.method})
    tracker.log_params(schema.trial_params(trial.method, trial.hyper, over_budget=trial.status == schema.INFEASIBLE,
                                           workers=1, deepspeed=False, zero_stage=0))
    tracker.log_metrics({schema.TRAINABLE_PARAMS: trial.trainable})
    for epoch, value in enumerate(trial.epochs):
        tracker.log_epoch(report(epoch, value, trial))
    for epoch, value in trial.relogged_epochs.items():  # the restart's first report re-logs an epoch
        tracker.log_epoch(report(epoch, value, trial))
    return tracker


def report(epoch: int, cider: float, trial: Trial) -> dict:
    """One epoch's report, with the keys the worker reports to Tune and logs."""
    return {schema.EPOCH: epoch, schema.CIDER: cider, schema.TRAINABLE_PARAMS: trial.trainable,
            schema.LOSS: 1.0 / (epoch + 1), schema.EPOCH_SECONDS: 1.0, schema.VAL_CIDER: cider}


def end_trial(tracker: writer.TrialTracker, trial: Trial) -> None:
    if trial.status == schema.FINISHED:
        tracker.log_metrics(
            {schema.CIDER: trial.cider, schema.TRAINABLE_PARAMS: trial.trainable,
             schema.TOTAL_PARAMS: trial.measured_total},
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
    empty = writer.start_study_run(uri, main.experiment_id, "empty", {})
    twice = [writer.start_study_run(uri, main.experiment_id, "twice", {}) for _ in range(2)]
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
