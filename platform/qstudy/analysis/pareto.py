"""Finds a study's trade-off between caption quality and size: the CIDEr-vs-trainable-parameters Pareto front.

Every function works on :class:`~qstudy.records.TrialRecord`, a plain snapshot of one trial, so
the same code serves an MLflow experiment or a test's hand-made list. The objectives are
val CIDEr (maximised) and trainable parameters (minimised). Only *valid* records take part in
comparisons: status FINISHED with both numbers present. Failed trials may still be passed in;
they are skipped, but they keep their place in :func:`hypervolume_history`.

This module imports no torch, so the study driver and CI can use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from qstudy.records import TrialRecord


def front_ranks(losses: np.ndarray) -> np.ndarray:
    """The 0-based non-dominated front of each row of ``losses`` (rows: points; every column minimised).

    Optuna's ``_fast_non_domination_rank``, the routine its NSGA-II sampler and
    ``Study.best_trials`` rank with: vectorised and maintained, but private (Optuna 5 has no
    public one), so this is the one place qstudy touches it, and tests/analysis/test_pareto.py
    pins its meaning (ties and duplicates included) against a brute-force definition.
    """
    from optuna.study._multi_objective import _fast_non_domination_rank

    return _fast_non_domination_rank(losses)


def valid_records(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The records that finished with both CIDEr and a parameter count."""
    return [record for record in records if record.is_valid]


def pareto_front(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The valid records no other valid record dominates, cheapest first.

    A record dominates another when it is at least as good in both objectives and better in
    one. Two records with identical (CIDEr, params) do not dominate each other, so both stay.
    """
    candidates = valid_records(records)
    if not candidates:
        return []
    losses = np.array([[record.trainable_params, -record.cider] for record in candidates], dtype=float)
    front = [record for record, rank in zip(candidates, front_ranks(losses)) if rank == 0]
    return sorted(front, key=lambda record: (record.trainable_params, -record.cider, record.order))


def default_reference(records: Iterable[TrialRecord]) -> tuple[float, float]:
    """The hypervolume reference point ``(0.0, 1.1 x the largest trainable count)``.

    CIDEr 0 is the floor any captioner reaches. The 10% margin on parameters lets the largest
    trial still add a sliver of area: a point exactly on the reference adds none. With no
    valid record it is ``(0.0, 0.0)``, and every hypervolume is 0.
    """
    largest = max((record.trainable_params for record in valid_records(records)), default=0)
    return (0.0, 1.1 * largest)


def hypervolume(records: Iterable[TrialRecord], reference: tuple[float, float]) -> float:
    """Area of the (params, CIDEr) region the valid records dominate, bounded by ``reference``.

    ``reference`` is ``(lowest acceptable CIDEr, highest acceptable trainable params)``; a
    record worse than it in either objective adds nothing. Units are CIDEr x parameters, so
    compare hypervolumes only under the same reference.
    """
    cider_floor, params_ceiling = reference
    inside = [
        record
        for record in valid_records(records)
        if record.cider >= cider_floor and record.trainable_params <= params_ceiling
    ]
    # In two objectives the dominated region is a staircase: sweep the records from the best
    # CIDEr down, each adding the strip between its size and the smallest size seen so far.
    area, smallest = 0.0, float(params_ceiling)
    for record in sorted(inside, key=lambda record: (-record.cider, record.trainable_params)):
        if record.trainable_params < smallest:
            area += (record.cider - cider_floor) * (smallest - record.trainable_params)
            smallest = record.trainable_params
    return area


def hypervolume_history(records: Iterable[TrialRecord], reference: tuple[float, float]) -> list[tuple[int, float]]:
    """``[(order, hypervolume after that trial), ...]`` in completion order; never decreases.

    Failed trials get an entry too (the value carries over), so the x axis counts every trial.
    """
    history = []
    front: list[TrialRecord] = []
    for record in sorted(records, key=lambda record: record.order):
        # Only the running front can matter for later hypervolumes, which keeps each step small.
        front = pareto_front([*front, record])
        history.append((record.order, hypervolume(front, reference)))
    return history


def knee_point(front: Sequence[TrialRecord]) -> TrialRecord | None:
    """The front's knee: the trial that saves the most parameters for the least CIDEr.

    Both objectives are scaled to [0, 1] over the front, parameters as log10 because counts
    span orders of magnitude. On a front the cheapest trial also has the lowest CIDEr and the
    largest the highest, so the two extremes land at (0, 0) and (1, 1), and the distance of a
    point above the chord joining them is proportional to ``cider_scaled - params_scaled``.
    The knee is the point farthest above the chord; a point below it (a concave stretch) is
    never a knee. Ties go to fewer parameters, so a two-point front returns the cheaper one.
    ``front`` should come from :func:`pareto_front`.
    """
    if not front:
        return None
    log_params = [math.log10(max(record.trainable_params, 1)) for record in front]  # 0 -> -inf otherwise
    ciders = [record.cider for record in front]

    def scaled(value: float, values: list[float]) -> float:
        span = max(values) - min(values)
        return (value - min(values)) / span if span else 0.0

    def height_above_chord(index: int) -> float:
        return scaled(ciders[index], ciders) - scaled(log_params[index], log_params)

    best = max(range(len(front)), key=lambda index: (height_above_chord(index), -front[index].trainable_params))
    return front[best]


def best_under_budget(records: Iterable[TrialRecord], budget: int | None) -> TrialRecord | None:
    """The highest-CIDEr valid record with at most ``budget`` trainable parameters (ties: fewer params).

    With ``budget=None`` every valid record is affordable: the study's best CIDEr.
    """
    affordable = [record for record in valid_records(records) if budget is None or record.trainable_params <= budget]
    return min(affordable, key=lambda record: (-record.cider, record.trainable_params, record.order), default=None)


_BUDGET = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>%|[kKmMbB]?)")
_UNIT_MULTIPLIERS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


def parse_budget(text: str, total_params: int) -> int:
    """A trainable-parameter count from ``"1.5%"`` (of ``total_params``) or ``"250000"``, ``"250k"``, ``"1.2M"``."""
    match = _BUDGET.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"budget {text!r}: expected a percentage of the model's parameters (1.5%) "
            "or a parameter count (250000, 250k, 1.2M)"
        )
    number, unit = float(match["number"]), match["unit"].lower()
    if unit == "%":
        if number > 100:
            raise ValueError(f"budget {text!r}: a percentage of the model's parameters cannot exceed 100%")
        budget = round(total_params * number / 100)
    else:
        budget = round(number * _UNIT_MULTIPLIERS[unit])
    if budget < 1:
        raise ValueError(f"budget {text!r}: allows less than one trainable parameter")
    return budget


@dataclass(frozen=True)
class StudyAnalysis:
    """Everything the report, the dashboards and the export read off one set of trials, computed once."""

    records: tuple[TrialRecord, ...]  # completion order, failed trials included
    front: tuple[TrialRecord, ...]
    knee: TrialRecord | None
    reference: tuple[float, float]  # (CIDEr floor, trainable-parameter ceiling)
    hypervolume: float
    history: tuple[tuple[int, float], ...]
    best: TrialRecord | None  # highest CIDEr, whatever its size
    budget: int | None = None
    best_under_budget: TrialRecord | None = None

    @property
    def valid(self) -> list[TrialRecord]:
        return valid_records(self.records)

    @property
    def ideal_box(self) -> float:
        """Area between the reference point and the ideal point (best CIDEr seen, 0 parameters)."""
        if self.best is None:
            return 0.0
        return max(self.best.cider - self.reference[0], 0.0) * self.reference[1]


def analyse(
    records: Iterable[TrialRecord], reference: tuple[float, float] | None = None, budget: int | None = None
) -> StudyAnalysis:
    """Front, knee, hypervolume (``reference`` defaults to :func:`default_reference`) and best trials."""
    records = tuple(sorted(records, key=lambda record: record.order))
    reference = reference if reference is not None else default_reference(records)
    front = pareto_front(records)
    return StudyAnalysis(
        records=records,
        front=tuple(front),
        knee=knee_point(front),
        reference=reference,
        hypervolume=hypervolume(front, reference),
        history=tuple(hypervolume_history(records, reference)),
        best=best_under_budget(records, None),
        budget=budget,
        best_under_budget=best_under_budget(records, budget) if budget is not None else None,
    )


def _percent_of_total(record: TrialRecord) -> str:
    if not record.total_params:
        return "-"
    return f"{100 * record.trainable_params / record.total_params:.3g}%"


def front_table(front: Sequence[TrialRecord], knee: TrialRecord | None = None) -> str:
    """The front as an aligned plain-text table for the terminal; the knee row is starred."""
    header = ("trial", "method", "config", "CIDEr", "trainable", "% of total", "knee")
    numeric_columns = {3, 4, 5}
    rows = [
        (
            record.trial_id,
            record.method,
            record.config or "-",
            f"{record.cider:.4f}",
            f"{record.trainable_params:,}",
            _percent_of_total(record),
            "*" if knee is not None and record == knee else "",
        )
        for record in front
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            cell.rjust(width) if column in numeric_columns else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths))
        )
        return "  ".join(aligned).rstrip()

    lines = [line(header), line(["-" * width for width in widths]), *(line(row) for row in rows)]
    if not rows:
        lines.append("(no finished trial has both a CIDEr and a parameter count)")
    return "\n".join(lines)
