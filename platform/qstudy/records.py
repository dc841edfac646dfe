"""Trial records: one trial's outcome as every reader of a study sees it, built from MLflow's runs, and counted.

The study's summary, its parent run's counts, ``qstudy report``, the dashboards and the export
all take their trials from :func:`from_mlflow`, so they name a trial's hyperparameters, status
and totals the same way and count them with :func:`trial_counts`. A trial's held-out scores
(``qstudy evaluate``) are a :class:`HeldOutScores` beside its record, never part of it: what
ranks and selects trials cannot read them. This module imports no torch and no MLflow.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qstudy.tracking.reader import TrialRun
from qstudy.tracking.schema import (
    CAPTION_METRICS,
    CIDER,
    ERROR_TAG,
    FINISHED,
    METHOD_PARAM,
    METHOD_TAG,
    STATUS_TAG,
    TEST_BEAMS_TAG,
    TEST_PREFIX,
    TEST_SPLIT_TAG,
    TOTAL_PARAMS,
    TRAINABLE_PARAMS,
    TRIAL_ID_TAG,
    VAL_PREFIX,
    searched_params,
)

# Short keys keep labels legible in plot legends and hover text; other keys print in full.
_SHORT_KEYS = {
    "num_query_tokens": "K",
    "insertion_layers": "L",
    "rank": "r",
    "learning_rate": "lr",
    "weight_decay": "wd",
    "queries_to_lm": "q2lm",
}
# Values that say what they are on their own ("tanh", "vision") print without their key.
_BARE_VALUE_KEYS = {"gating", "target"}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(item) for item in value)
    return str(value)


@dataclass(frozen=True)
class TrialRecord:
    """One trial's outcome: its hyperparameters and the two objectives, whatever tracked it."""

    trial_id: str
    study: str
    method: str
    params: dict[str, Any]  # the sampled hyperparameters, by dotted run-config key
    cider: float | None  # None when the trial failed or logged no metric
    trainable_params: int | None
    total_params: int | None  # measured on the trial's model: the base plus what its method adds
    status: str  # "FINISHED", "FAILED", "INFEASIBLE", "OUT_OF_MEMORY", ...
    epoch_cider: tuple[float, ...] = ()
    run_id: str | None = None
    order: int = 0  # completion order, the x axis of the hypervolume history
    error: str | None = None  # what a FAILED trial raised, or the allocation an OUT_OF_MEMORY one could not make

    @property
    def is_valid(self) -> bool:
        """Finished with both objectives measured: the only records that are compared."""
        return (
            self.status == FINISHED
            and self.cider is not None
            and not math.isnan(self.cider)
            and self.trainable_params is not None
        )

    @property
    def config(self) -> str:
        """The hyperparameters in a few characters, e.g. ``K=8 L=last:2 tanh r=16``."""
        parts = []
        for key, value in self.params.items():
            name = key.rpartition(".")[2]  # "adapter.rank" reads like "rank"
            if name == METHOD_PARAM:  # already the label's first word
                continue
            if isinstance(value, bool):
                if value:  # a flag reads as its name when on and is left out when off
                    parts.append(_SHORT_KEYS.get(name, name))
            elif name in _BARE_VALUE_KEYS:
                parts.append(_format_value(value))
            else:
                parts.append(f"{_SHORT_KEYS.get(name, name)}={_format_value(value)}")
        return " ".join(parts)

    @property
    def label(self) -> str:
        """Method plus compact hyperparameters, e.g. ``qadapter K=8 L=last:2 tanh r=16``."""
        return f"{self.method} {self.config}".rstrip()


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)


def from_mlflow(runs: Sequence[TrialRun]) -> list[TrialRecord]:
    """A record per trial run, ``order`` numbering them as given (the reader gives completion order)."""
    return [
        TrialRecord(
            trial_id=run.tags.get(TRIAL_ID_TAG, run.run_id),
            study=run.study,
            method=run.tags.get(METHOD_TAG) or run.params.get(METHOD_PARAM, ""),
            params=searched_params(run.params),
            cider=run.metrics.get(CIDER),
            trainable_params=_count(run.metrics.get(TRAINABLE_PARAMS)),
            total_params=_count(run.metrics.get(TOTAL_PARAMS)),
            # A run the engine never closed (driver killed) has no qstudy status beyond RUNNING.
            status=run.tags.get(STATUS_TAG) or run.mlflow_status,
            epoch_cider=run.epoch_cider,
            run_id=run.run_id,
            order=order,
            error=run.tags.get(ERROR_TAG),
        )
        for order, run in enumerate(runs)
    ]


@dataclass(frozen=True)
class HeldOutScores:
    """A trial's scores on a held-out split beside its final validation scores: a row of the paper table."""

    record: TrialRecord
    split: str
    beams: int | None
    val: dict[str, float]  # by CAPTION_METRICS name: those the trial measured (METEOR may be off)
    test: dict[str, float]


def held_out_scores(runs: Sequence[TrialRun], records: Sequence[TrialRecord]) -> list[HeldOutScores]:
    """The trials ``qstudy evaluate`` scored, from their runs (``records``: :func:`from_mlflow` of the same runs)."""
    scored = []
    for run, record in zip(runs, records, strict=True):
        test = {name: run.metrics[TEST_PREFIX + name] for name in CAPTION_METRICS if TEST_PREFIX + name in run.metrics}
        if not test:
            continue
        val = {name: run.metrics[VAL_PREFIX + name] for name in CAPTION_METRICS if VAL_PREFIX + name in run.metrics}
        beams = run.tags.get(TEST_BEAMS_TAG)
        scored.append(HeldOutScores(record, run.tags.get(TEST_SPLIT_TAG, "?"), int(beams) if beams else None, val,
                                    test))
    return scored


def trial_counts(records: Iterable[TrialRecord]) -> dict[str, int]:
    """Trials per status, as the report, the study's summary and its parent run's metrics all count them."""
    counts = Counter(record.status for record in records)
    return {status: counts[status] for status in sorted(counts)}


def format_counts(records: Iterable[TrialRecord]) -> str:
    """``2 finished, 1 out of memory``: the counts line of the report and of the study's summary."""
    return ", ".join(f"{count} {status.lower().replace('_', ' ')}" for status, count in trial_counts(records).items()
                     ) or "no trials"
