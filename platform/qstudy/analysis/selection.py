"""Which trials a ``--select`` names: the front, its knee, the best val CIDEr, or the best under a parameter budget.

``qstudy export`` and ``qstudy evaluate`` choose their trials here, from the analysis of the
trials' validation results only; held-out (test) scores never enter a choice. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstudy.analysis.pareto import best_under_budget
from qstudy.analysis.report import StudySelection, parameter_count
from qstudy.core.errors import ConfigError, QstudyError
from qstudy.records import TrialRecord

SELECTIONS = ("front", "knee", "best", "budget=<count or %>")


class EmptySelection(QstudyError):
    """No finished trial qualifies for the selection."""


@dataclass(frozen=True)
class Selection:
    """What ``--select`` asked for: ``front``, ``knee``, ``best`` or ``budget`` with its text."""

    kind: str
    budget_text: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Selection":
        kind, equals, budget = text.partition("=")
        if kind in ("front", "knee", "best") and not equals:
            return cls(kind)
        if kind == "budget" and budget.strip():
            return cls(kind, budget.strip())
        raise ConfigError(f"--select {text!r}: expected one of {', '.join(SELECTIONS)}")

    def __str__(self) -> str:
        return self.kind if self.budget_text is None else f"{self.kind}={self.budget_text}"


def select_trials(selection: StudySelection, choice: Selection) -> list[tuple[TrialRecord, str]]:
    """The chosen trials, each with the reason it was chosen."""
    analysis = selection.analysis
    if choice.kind == "front":
        count = len(analysis.front)
        if not count:
            raise EmptySelection("--select front: no finished trial, so the Pareto front is empty")
        return [
            (record, f"on the Pareto front ({rank} of {count}, cheapest first)"
             + (", its knee" if record == analysis.knee else ""))
            for rank, record in enumerate(analysis.front, start=1)
        ]
    if choice.kind == "knee":
        chosen, reason = analysis.knee, "the knee of the Pareto front: most parameters saved for the least CIDEr"
    elif choice.kind == "best":
        chosen, reason = analysis.best, "the highest val CIDEr of the study"
    else:
        try:
            budget = parameter_count(choice.budget_text, selection.studies)
        except ValueError as error:
            raise ConfigError(f"--select budget={choice.budget_text}: {error}") from None
        chosen = best_under_budget(analysis.records, budget)
        reason = f"the highest val CIDEr within the budget {choice.budget_text} ({budget:,} trainable params)"
    if chosen is None:
        raise EmptySelection(f"--select {choice.kind}: no finished trial qualifies ({reason})")
    return [(chosen, reason)]
