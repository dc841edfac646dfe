"""Reads studies back from MLflow: a study's parent run by name or id, its trials' child runs in completion order.

The report and the export work from the tracking store alone, so they serve a study run on
another machine as well as a local one, and several studies (Q-Adapter and the baselines)
at once. The layout and every name in it are :mod:`qstudy.tracking.schema`'s; what comes
back is plain data (:class:`StudyRun`, :class:`TrialRun`) that :mod:`qstudy.records` turns
into trial records. This module imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstudy.tracking.schema import (
    BASE_TOTAL_PARAM,
    PARENT_RUN_TAG,
    ROLE_TAG,
    STUDY_ROLE,
    STUDY_TAG,
    VAL_CIDER,
    decode_param,
)
from qstudy.tracking.writer import check_reachable, mlflow_client

_RUN_ID = re.compile(r"[0-9a-f]{32}")


class StudyNotFound(LookupError):
    """No parent run matches the study name (or several do); the message lists what exists."""


@dataclass(frozen=True)
class StudyRun:
    """Where one study lives in MLflow: its experiment and its parent run."""

    name: str
    experiment_id: str
    parent_run_id: str
    base_total_params: int | None = None  # the base model's parameter count the parent run logged


@dataclass(frozen=True)
class TrialRun:
    """One trial's child run as logged: tags, params (MLflow's text), latest metrics, per-epoch val CIDEr."""

    run_id: str
    study: str
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]
    mlflow_status: str
    epoch_cider: tuple[float, ...]


def client_for(uri: str):
    """A client for reading ``uri``; an HTTP server that does not answer fails here, naming how to start one."""
    check_reachable(uri)
    return mlflow_client(uri)


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


def _study_run(run, name: str) -> StudyRun:
    total = run.data.params.get(BASE_TOTAL_PARAM)
    return StudyRun(name, run.info.experiment_id, run.info.run_id,
                    int(decode_param(total)) if total is not None else None)


def find_study(client, study: str) -> StudyRun:
    """The parent run of ``study``: a study name, or the parent run's id."""
    if _RUN_ID.fullmatch(study):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(study)
        except MlflowException:
            run = None
        if run is not None and run.data.tags.get(ROLE_TAG) == STUDY_ROLE:
            return _study_run(run, run.data.tags.get(STUDY_TAG, study))
    matches = _study_runs(client, f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}' and tags.`{STUDY_TAG}` = '{study}'")
    if len(matches) == 1:
        return _study_run(matches[0], study)
    if matches:
        ids = ", ".join(run.info.run_id for run in matches)
        raise StudyNotFound(f"study {study!r} has {len(matches)} parent runs ({ids}); name one by its run id")
    parents = _study_runs(client, f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}'")
    known = ", ".join(sorted({run.data.tags.get(STUDY_TAG, "?") for run in parents})) or "none"
    raise StudyNotFound(f"no study {study!r} in MLflow at {client.tracking_uri}; studies there: {known}")


def _epoch_values(client, run_id: str, key: str) -> tuple[float, ...]:
    """A per-epoch metric in epoch order; a restarted trial's re-logged epoch counts once (the later)."""
    by_step = {}
    for metric in sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.timestamp):
        by_step[metric.step] = metric.value
    return tuple(by_step[step] for step in sorted(by_step))


def _completion_key(run) -> tuple[float, float, str]:
    # MLflow's end time is when the trial closed its run; one still open sorts last.
    end = run.info.end_time if run.info.end_time else float("inf")
    return (end, run.info.start_time or 0, run.info.run_id)


def load_trial_runs(client, studies: Sequence[StudyRun]) -> list[TrialRun]:
    """Every trial of ``studies``, in completion order across all of them."""
    runs = []
    for study in studies:
        children = _pages(
            client.search_runs,
            experiment_ids=[study.experiment_id],
            filter_string=f"tags.`{PARENT_RUN_TAG}` = '{study.parent_run_id}'",
        )
        runs += [(run, study.name) for run in children]
    runs.sort(key=lambda pair: _completion_key(pair[0]))
    return [TrialRun(run_id=run.info.run_id, study=name, tags=dict(run.data.tags), params=dict(run.data.params),
                     metrics=dict(run.data.metrics), mlflow_status=run.info.status,
                     epoch_cider=_epoch_values(client, run.info.run_id, VAL_CIDER))
            for run, name in runs]


def final_metrics(client, run_id: str) -> dict[str, float]:
    """A run's metrics, each at its last logged value, by name."""
    return dict(sorted(client.get_run(run_id).data.metrics.items()))


def download_artifact(client, run_id: str, path: str, destination: Path) -> Path:
    """One of a run's artifacts, copied into ``destination`` (a directory); its local path."""
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(destination)))
