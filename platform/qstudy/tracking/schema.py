"""The MLflow schema: every tag, param, metric and artifact name qstudy writes or reads, and how params are encoded.

A study is an experiment per study family, a parent run per study and a child run per trial.
The writer (:mod:`qstudy.tracking.writer`), the reader (:mod:`qstudy.tracking.reader`), the
records built from what the reader returns, and the tests all take the names from here, so a
name changed here changes on both sides at once. A trial's params are its sampled
hyperparameters plus the :data:`TRIAL_RUN_PARAMS` that say how it ran; which is which is this
list, not a property of the names. This module imports nothing from MLflow.
"""

from __future__ import annotations

import json
from typing import Any

# -- tags ----------------------------------------------------------------------------------------
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
STUDY_TAG = "qstudy.study"  # the study's name, on its parent run and on every trial's run
ROLE_TAG = "qstudy.role"  # STUDY_ROLE on a parent run
STUDY_ROLE = "study"
TRIAL_ID_TAG = "qstudy.trial_id"  # Tune's trial id: how a restarted trial finds its run again
METHOD_TAG = "qstudy.method"
STATUS_TAG = "qstudy.status"  # one of STATUSES (RUNNING while open)
NODE_TAG = "qstudy.node"  # the Ray node id a trial (its rank 0) last trained on
ERROR_TAG = "qstudy.error"  # what a FAILED trial raised, or the allocation an OUT_OF_MEMORY trial could not make
RESTARTED_FROM_TAG = "qstudy.restarted_from"  # the checkpoint directory a restarted trial continued from
STOPPED_AT_TAG = "qstudy.stopped_at_epochs"  # the rung (completed epochs) a STOPPED trial reached
ERROR_TAG_LIMIT = 4000  # characters of an error kept in ERROR_TAG
# On a trial's run once `qstudy evaluate` scored it on held-out data: tags, not params, because a
# later evaluation (other beams) replaces them, and a param is both immutable and read as a hyperparameter.
TEST_SPLIT_TAG = "qstudy.test_split"  # the split the TEST_PREFIX metrics were measured on
TEST_BEAMS_TAG = "qstudy.test_beams"  # the beam width they were decoded with

# -- statuses (STATUS_TAG) -------------------------------------------------------------------------
FINISHED, FAILED, INFEASIBLE, RUNNING = "FINISHED", "FAILED", "INFEASIBLE", "RUNNING"
LOST = "LOST"  # started by a driver that died before Tune's experiment state recorded the trial
INTERRUPTED = "INTERRUPTED"  # stopped by Ctrl-C with the study; `qstudy study --resume` continues it
STOPPED = "STOPPED"  # stopped early by the study's scheduler: its last CIDEr is a low-fidelity one
# Its training ran out of memory (host or GPU): a config too large for the machine, not a failure of the code.
OUT_OF_MEMORY = "OUT_OF_MEMORY"
# MLflow's own run status for each closing qstudy status: an infeasible trial ran to its end; the
# machine, not the code, ended an out-of-memory one, so MLflow's FAILED keeps meaning the code raised.
MLFLOW_STATUS = {FINISHED: "FINISHED", FAILED: "FAILED", INFEASIBLE: "FINISHED", LOST: "KILLED",
                 INTERRUPTED: "KILLED", STOPPED: "KILLED", OUT_OF_MEMORY: "KILLED"}

# -- params of a trial's run -----------------------------------------------------------------------
METHOD_PARAM = "method"
OVER_BUDGET_PARAM = "over_budget"
WORKERS_PARAM = "workers"
DEEPSPEED_PARAM = "deepspeed"
ZERO_STAGE_PARAM = "zero_stage"
# How a trial ran, not what was searched: every other param of a trial is a sampled hyperparameter.
TRIAL_RUN_PARAMS = (METHOD_PARAM, OVER_BUDGET_PARAM, WORKERS_PARAM, DEEPSPEED_PARAM, ZERO_STAGE_PARAM)

# -- params of a study's parent run ----------------------------------------------------------------
SPACE_PARAM = "space"
SAMPLER_PARAM = "sampler"
TRIALS_PARAM = "trials"
CONCURRENCY_PARAM = "concurrency"
WORKERS_PER_TRIAL_PARAM = "workers_per_trial"
PARAMETER_BUDGET_PARAM = "parameter_budget"
ARMS_PARAM = "arms"
BASE_TOTAL_PARAM = "total_params"  # the base model's parameter count: what a percentage budget is a share of

# -- metrics of a trial's run ----------------------------------------------------------------------
CIDER = "cider"  # the final val CIDEr, the objective
TRAINABLE_PARAMS = "trainable_params"
TOTAL_PARAMS = "total_params"  # measured on the trial's model: the base plus what its method adds
VAL_PREFIX = "val_"  # per-epoch validation metrics, at step = epoch
VAL_CIDER = f"{VAL_PREFIX}{CIDER}"
EPOCH = "epoch"  # a report's epoch: the step its metrics are logged at, never a metric itself
LOSS = "loss"
EPOCH_SECONDS = "epoch_seconds"
EPOCH_KEYS = (LOSS, EPOCH_SECONDS)  # with every VAL_PREFIX metric: what a trial logs per epoch
SKIPPED_VIDEOS = "skipped_videos"
WALL_SECONDS = "wall_seconds"
# The caption metrics the papers print (BLEU@4, METEOR, ROUGE-L, CIDEr), as metrics/coco.py names them:
# logged with VAL_PREFIX per epoch and with TEST_PREFIX by `qstudy evaluate`.
CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider")
# Held-out scores, logged once per evaluation at step 0; nothing that selects or ranks trials reads them.
TEST_PREFIX = "test_"
TEST_METRICS = tuple(f"{TEST_PREFIX}{name}" for name in CAPTION_METRICS)
TEST_CLIPS = f"{TEST_PREFIX}clips"  # the held-out clips that decoded and were scored
TEST_SKIPPED_VIDEOS = f"{TEST_PREFIX}skipped_videos"

# -- metrics of a study's parent run ---------------------------------------------------------------
BEST_CIDER = "best_cider"
UNDELIVERED_TRIALS = "undelivered_trials"
STUDY_WALL_SECONDS = "study_wall_seconds"

# -- a rehearsal (`qstudy rehearse`): a study of one trial per arm in an experiment of its own -------
REHEARSAL_EXPERIMENT_SUFFIX = "-rehearsal"  # the space's study family + this: never the family's own experiment
REHEARSAL_TAG = "qstudy.rehearsal_of"  # on a rehearsal's parent run: the space file it rehearsed
REHEARSAL_DEVICE_HOURS = "rehearsal_device_hours"  # on its parent run: the full study's estimate
REHEARSAL_ARM_METRICS = ("step_seconds", "eval_seconds_per_clip", "peak_memory_mb", "checkpoint_bytes",
                         "trial_device_hours")  # per arm on the parent run, as rehearsal_metric names them
REHEARSAL_ARTIFACT = "rehearsal.json"  # on its parent run: the per-arm table and how the estimate was made

# -- artifacts -------------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"  # a trial's complete run config
WEIGHTS_ARTIFACT = "adapter.safetensors"  # a trial's trained parameters
METRICS_ARTIFACT = "metrics.json"  # a trial's run result
SUMMARY_ARTIFACT = "summary.json"  # a study's records and front, on its parent run
DASHBOARDS_ARTIFACT_DIR = "dashboards"  # `qstudy report`'s views, on each parent run

PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
# str() writes these three; json cannot read them back.
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def trials_metric(status: str) -> str:
    """The parent run's count of trials that closed with ``status``, e.g. ``trials_finished``."""
    return f"trials_{status.lower()}"


def rehearsal_metric(method: str, name: str) -> str:
    """A rehearsed arm's measurement on the rehearsal's parent run, e.g. ``qadapter.step_seconds``."""
    return f"{method}.{name}"


def trial_params(method: str, hyperparameters: dict[str, Any], *, over_budget: bool, workers: int,
                 deepspeed: bool, zero_stage: int) -> dict[str, Any]:
    """Everything a trial logs as params: its sampled ``hyperparameters`` and how it ran."""
    clash = set(hyperparameters) & set(TRIAL_RUN_PARAMS)
    if clash:
        raise ValueError(f"hyperparameters {sorted(clash)} would be read back as how the trial ran")
    return {METHOD_PARAM: method, **hyperparameters, OVER_BUDGET_PARAM: over_budget, WORKERS_PARAM: workers,
            DEEPSPEED_PARAM: deepspeed, ZERO_STAGE_PARAM: zero_stage}


def searched_params(params: dict[str, str]) -> dict[str, Any]:
    """A trial's logged params back to its sampled hyperparameters, typed, in key order."""
    return {key: decode_param(value) for key, value in sorted(params.items()) if key not in TRIAL_RUN_PARAMS}


def encode_param(value: Any) -> str:
    """A param value as MLflow stores it: lists and mappings as JSON, anything else as ``str``."""
    return (json.dumps(value) if isinstance(value, (list, dict)) else str(value))[:PARAM_LIMIT]


def decode_param(text: str) -> Any:
    """A logged param back to its value: numbers, booleans and JSON lists typed, anything else text."""
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text
