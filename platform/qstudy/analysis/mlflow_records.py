"""Reads studies' trials back from MLflow as :class:`TrialRecord` lists, in completion order.

The report and the export work from the tracking store alone, so they serve a study run on
another machine as well as a local one, and several studies (Q-Adapter and the baselines)
at once. The layout is the study engine's (:mod:`qstudy.study.tracking`): a parent run per
study tagged ``qstudy.role=study`` and ``qstudy.study=<name>``, a child run per trial
(``mlflow.parentRunId``, ``qstudy.trial_id``, ``qstudy.method``, ``qstudy.status``) whose
params are the sampled hyperparameters, whose metrics hold ``cider``,
``trainable_params``, ``total_params`` and per-epoch ``val_cider`` (step = epoch), and
whose artifacts are ``config.yaml``, ``adapter.safetensors`` and ``metrics.json``.
This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstudy.analysis.pareto import TrialRecord

STUDY_ROLE = "study"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
# MLflow writes Python's str() of non-JSON values; these three are the ones json cannot read.
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


class StudyNotFound(LookupError):
    """No parent run matches the study name (or several do); the message lists what exists."""


@dataclass(frozen=True)
class StudyRun:
    """Where one study lives in MLflow: its experiment and its parent run."""

    name: str
    experiment_id: str
    parent_run_id: str


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri`` as given, else the embedded default (the sqlite store under ``$QSTUDY_HOME``)."""
    if uri:
        return uri
    from qstudy.core.paths import qstudy_home
    from qstudy.study.tracking import default_tracking_uri

    return default_tracking_uri(qstudy_home())


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    from qstudy.study.tracking import check_reachable, fail_fast_on_outage

    check_reachable(uri)
    fail_fast_on_outage()
    # Its progress bars would land in the middle of the report and the export index on stdout.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def _pages(search, **kwargs) -> Iterator[Any]:
    token = None
    while True:
        page = search(**kwargs, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _study_runs(client, filter_string: str) -> list:
    experiment_ids = [experiment.experiment_id for experiment in _pages(client.search_experiments)]
    if not experiment_ids:
        return []
    return list(_pages(client.search_runs, experiment_ids=experiment_ids, filter_string=filter_string))


def find_study(client, study: str) -> StudyRun:
    """The parent run of ``study``: a study name, or the parent run's id."""
    if _RUN_ID.fullmatch(study):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(study)
        except MlflowException:
            run = None
        if run is not None and run.data.tags.get("qstudy.role") == STUDY_ROLE:
            return StudyRun(run.data.tags.get("qstudy.study", study), run.info.experiment_id, run.info.run_id)
    matches = _study_runs(client, f"tags.`qstudy.role` = '{STUDY_ROLE}' and tags.`qstudy.study` = '{study}'")
    if len(matches) == 1:
        run = matches[0]
        return StudyRun(study, run.info.experiment_id, run.info.run_id)
    if matches:
        ids = ", ".join(run.info.run_id for run in matches)
        raise StudyNotFound(f"study {study!r} has {len(matches)} parent runs ({ids}); name one by its run id")
    parents = _study_runs(client, f"tags.`qstudy.role` = '{STUDY_ROLE}'")
    known = ", ".join(sorted({run.data.tags.get("qstudy.study", "?") for run in parents})) or "none"
    raise StudyNotFound(f"no study {study!r} in MLflow at {client.tracking_uri}; studies there: {known}")


def parse_param(text: str) -> Any:
    """A logged param back to its value: numbers, booleans and JSON lists typed, anything else text."""
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _hyperparameters(params: dict[str, str]) -> dict[str, Any]:
    # The sampled values are dotted run-config keys ("adapter.rank"); the trial's other params
    # (workers, deepspeed, over_budget) describe how it ran, not what was searched.
    return {key: parse_param(value) for key, value in sorted(params.items()) if "." in key}


def _epoch_values(client, run_id: str, key: str) -> tuple[float, ...]:
    """A per-epoch metric in epoch order; a restarted trial's re-logged epoch counts once (the later)."""
    by_step = {}
    for metric in sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.timestamp):
        by_step[metric.step] = metric.value
    return tuple(by_step[step] for step in sorted(by_step))


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)


def record_from_run(client, run, study: str, order: int) -> TrialRecord:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    return TrialRecord(
        trial_id=tags.get("qstudy.trial_id", run.info.run_id),
        study=study,
        method=tags.get("qstudy.method") or params.get("method", ""),
        params=_hyperparameters(params),
        cider=metrics.get("cider"),
        trainable_params=_count(metrics.get("trainable_params")),
        total_params=_count(metrics.get("total_params")),
        # A run the engine never closed (driver killed) has no qstudy status beyond RUNNING.
        status=tags.get("qstudy.status") or run.info.status,
        epoch_cider=_epoch_values(client, run.info.run_id, "val_cider"),
        run_id=run.info.run_id,
        order=order,
    )


def _completion_key(run) -> tuple[float, float, str]:
    # MLflow's end time is when the trial closed its run; one still open sorts last.
    end = run.info.end_time if run.info.end_time else float("inf")
    return (end, run.info.start_time or 0, run.info.run_id)


def load_records(client, studies: Sequence[StudyRun]) -> list[TrialRecord]:
    """Every trial of ``studies`` as a record, ``order`` numbering them by completion across all."""
    runs = []
    for study in studies:
        children = _pages(
            client.search_runs,
            experiment_ids=[study.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{study.parent_run_id}'",
        )
        runs += [(run, study.name) for run in children]
    runs.sort(key=lambda pair: _completion_key(pair[0]))
    return [record_from_run(client, run, name, order) for order, (run, name) in enumerate(runs)]


def download_artifact(client, run_id: str, path: str, destination: Path) -> Path:
    """One of a run's artifacts, copied into ``destination`` (a directory); its local path."""
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(destination)))
