"""``qstudy report``: studies read from MLflow, analysed, printed as a table, drawn as dashboards logged to MLflow.

The dashboards are written to a local directory and logged as artifacts on each study's
parent run (under ``dashboards/``), so they sit in the MLflow UI next to MLflow's own run
comparison. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qstudy.analysis.pareto import StudyAnalysis, analyse, front_table, parse_budget
from qstudy.analysis.views import ViewSpec
from qstudy.core.errors import ConfigError, QstudyError
from qstudy.records import HeldOutScores, TrialRecord, format_counts, from_mlflow, held_out_scores
from qstudy.tracking.reader import StudyNotFound, StudyRun, client_for, find_study, load_trial_runs
from qstudy.tracking.schema import BASE_TOTAL_PARAM, DASHBOARDS_ARTIFACT_DIR, ROLE_TAG, STUDY_ROLE
from qstudy.tracking.writer import is_remote, log_run_artifacts, resolve_tracking_uri


@dataclass(frozen=True)
class StudySelection:
    """The studies a report or an export reads, and the analysis of their trials together."""

    tracking_uri: str
    studies: tuple[StudyRun, ...]
    analysis: StudyAnalysis
    budget_text: str | None = None
    notes: tuple[str, ...] = ()  # how a name the user gave was read (an experiment's latest study)
    # The trials `qstudy evaluate` scored on held-out data; the analysis above never reads them.
    held_out: tuple[HeldOutScores, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(study.name for study in self.studies)


def base_total_params(studies: Sequence[StudyRun]) -> int:
    """The parameter count a percentage budget refers to: the base model's, as the studies' parent runs logged it."""
    missing = [study.name for study in studies if study.base_total_params is None]
    if missing:
        raise ValueError(f"the parent run of {', '.join(missing)} logged no {BASE_TOTAL_PARAM}, "
                         "so a percentage budget has nothing to refer to")
    totals = {study.base_total_params for study in studies}
    if len(totals) > 1:
        raise ValueError(f"the studies' base models differ ({', '.join(f'{t:,}' for t in sorted(totals))} "
                         "parameters), so a percentage budget means a different count in each; give a count")
    return totals.pop()


def parameter_count(text: str, studies: Sequence[StudyRun]) -> int:
    """A count from ``"250k"``/``"1.2M"``, or from ``"1.5%"`` of the base model the studies share."""
    # Only a percentage needs the base total (and fails without it).
    return parse_budget(text, base_total_params(studies) if text.strip().endswith("%") else 1)


def parse_reference(text: str, studies: Sequence[StudyRun]) -> tuple[float, float]:
    """``"CIDER,PARAMS"`` (e.g. ``0,1.2M`` or ``0.5,10%``): the worst point the hypervolume counts from."""
    cider_text, comma, params_text = text.partition(",")
    if not comma:
        raise ConfigError(f"--reference {text!r}: expected CIDER,PARAMS, e.g. 0,1.2M")
    try:
        cider_floor = float(cider_text)
    except ValueError:
        raise ConfigError(f"--reference {text!r}: CIDEr {cider_text!r} is not a number") from None
    try:
        return cider_floor, float(parameter_count(params_text, studies))
    except ValueError as error:
        raise ConfigError(f"--reference {text!r}: {error}") from None


def read_studies(
    names: list[str], tracking_uri: str | None, budget: str | None = None, reference: str | None = None
) -> StudySelection:
    """Find the studies in MLflow, read their trials and analyse them as one set."""
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    found = [find_named_study(client, name) for name in names]
    studies = tuple(study for study, _ in found)
    runs = load_trial_runs(client, studies)
    records = from_mlflow(runs)
    budget_count = None
    if budget is not None:
        try:
            budget_count = parameter_count(budget, studies)
        except ValueError as error:
            raise ConfigError(f"--budget: {error}") from None
    reference_point = parse_reference(reference, studies) if reference is not None else None
    return StudySelection(uri, studies, analyse(records, reference_point, budget_count), budget,
                          tuple(note for _, note in found if note), tuple(held_out_scores(runs, records)))


def find_named_study(client, name: str) -> tuple[StudyRun, str | None]:
    """``(study, note)`` for a study's name or parent run id, or an MLflow experiment's name (a space's ``study``),
    which means the latest study in it; the note says which. An unknown name is bad input listing the studies."""
    try:
        return find_study(client, name), None
    except StudyNotFound as error:
        experiment = client.get_experiment_by_name(name)
        latest = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}'",
                                    order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
        if not latest:
            raise QstudyError(str(error)) from None
        study = find_study(client, latest[0].info.run_id)
        return study, f"{name!r} is an MLflow experiment; reading its latest study, {study.name}"


def _describe(record: TrialRecord | None) -> str:
    if record is None:
        return "none"
    return (f"{record.label} (trial {record.trial_id}): CIDEr {record.cider:.4f}, "
            f"{record.trainable_params:,} trainable params")


def format_report(selection: StudySelection) -> str:
    """The terminal report: trial counts, the front table, hypervolume with its reference, knee, best, budget."""
    analysis = selection.analysis
    lines = []
    for study in selection.studies:
        lines.append(f"study {study.name}: MLflow experiment {study.experiment_id}, parent run {study.parent_run_id}")
    lines.append(f"{len(analysis.records)} trials: {format_counts(analysis.records)}")
    lines += ["", f"Pareto front (val CIDEr max, trainable parameters min): {len(analysis.front)} of "
              f"{len(analysis.valid)} finished trials", front_table(analysis.front, analysis.knee), ""]
    cider_floor, params_ceiling = analysis.reference
    share = f", {analysis.hypervolume / analysis.ideal_box:.3f} of the reference box" if analysis.ideal_box else ""
    lines.append(f"hypervolume: {analysis.hypervolume:.6g} (reference point: CIDEr {cider_floor:g}, "
                 f"{params_ceiling:,.0f} trainable params{share})")
    if analysis.ideal_box:
        shares = " ".join(f"{volume / analysis.ideal_box:.3f}" for _, volume in analysis.history)
        lines.append(f"  after each trial, in completion order: {shares}")
    lines.append(f"knee: {_describe(analysis.knee)}")
    lines.append(f"best CIDEr: {_describe(analysis.best)}")
    if analysis.budget is not None:
        lines.append(f"best under budget {selection.budget_text} ({analysis.budget:,} params): "
                     f"{_describe(analysis.best_under_budget)}")
    return "\n".join(lines)


def publish_dashboards(selection: StudySelection, views: list[ViewSpec], out_dir: Path, png: bool = True) -> list[Path]:
    """Write ``views`` into ``out_dir`` and log them on every study's parent run."""
    from qstudy.analysis.dashboards import write_dashboards

    paths = write_dashboards(selection.analysis, views, out_dir, png=png)
    for study in selection.studies:
        log_run_artifacts(selection.tracking_uri, study.parent_run_id, paths, dashboards_artifact_dir(selection))
    return paths


def dashboards_artifact_dir(selection: StudySelection) -> str:
    # A combined report goes under its own name, beside each study's own dashboards.
    return DASHBOARDS_ARTIFACT_DIR if len(selection.studies) == 1 else f"{DASHBOARDS_ARTIFACT_DIR}/{selection.name}"


def format_published(selection: StudySelection, out_dir: Path, paths: list[Path]) -> str:
    """Where the dashboards went, and how to look at them in the MLflow UI."""
    runs = ", ".join(study.parent_run_id for study in selection.studies)
    lines = [f"dashboards: {len(paths)} files in {out_dir}",
             f"  logged to MLflow ({selection.tracking_uri}) under {dashboards_artifact_dir(selection)}/ "
             f"of parent run {runs}"]
    if not is_remote(selection.tracking_uri):
        lines.append(f"  open the MLflow UI: mlflow ui --backend-store-uri {selection.tracking_uri} --port 5000, "
                     "then the study's parent run > Artifacts > dashboards")
    return "\n".join(lines)
