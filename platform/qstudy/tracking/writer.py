"""Writes studies to MLflow: the experiment, a study's parent run, and each trial's child run through an outbox.

Trials never talk to MLflow directly: a :class:`TrialTracker` appends every call to an
on-disk *outbox* (JSON lines) and delivers what it can. When the server is unreachable the
trial keeps training; the entries wait in the outbox and go out on the next delivery, at the
trial's end, or when the study driver sweeps the outboxes after the last trial. An outbox is
on the disk of the node its trial ran on, so the driver sweeps each node's with a task on that
node (study/tuner.py); which runs are still open is read from MLflow, which every node and
the driver reach alike. Child runs are found again by their trial id
tag, so a restarted or resumed trial reuses its run instead of creating a duplicate, and a
metric is logged at most once per step: an epoch a resumed trial replays from its checkpoint
is not logged again. Only the MlflowClient API is used (never the fluent
``mlflow.start_run``): an inherited ``MLFLOW_RUN_ID`` cannot hijack the nesting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qstudy.core.errors import ConfigError
from qstudy.tracking.schema import (
    EPOCH,
    EPOCH_KEYS,
    MLFLOW_STATUS,
    PARENT_RUN_TAG,
    REHEARSAL_ARTIFACT,
    ROLE_TAG,
    RUNNING,
    STATUS_TAG,
    STOPPED,
    STOPPED_AT_TAG,
    STUDY_ROLE,
    STUDY_TAG,
    SUMMARY_ARTIFACT,
    TRIAL_ID_TAG,
    VAL_PREFIX,
    encode_param,
)

log = logging.getLogger(__name__)

_ENTRIES = "entries.jsonl"  # a trial's outbox: one JSON line per MLflow call, in order


class TrackingUnavailable(ConfigError):
    """``--mlflow-uri`` names a server that does not answer; the message says how to start one."""


def fail_fast_on_outage() -> None:
    """A down server should cost one refused connection, not MLflow's minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def quiet_logs() -> None:
    """MLflow's INFO lines (creating and migrating a sqlite store) stay out of a study's terminal.

    The variable reaches the processes started afterwards (Ray's trial workers); mlflow reads it
    when first imported, and the level is set here too in case it already was.
    """
    level = os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(level.upper())


def default_tracking_uri(home: Path) -> str:
    """The embedded default: a sqlite store under ``$QSTUDY_HOME/mlflow``."""
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, home: Path | None = None) -> str:
    """``uri`` as given (``--mlflow-uri``), else the embedded default of ``home`` (default: ``$QSTUDY_HOME``)."""
    if uri:
        return uri
    from qstudy.core.paths import qstudy_home

    return default_tracking_uri(home or qstudy_home())


def is_remote(uri: str) -> bool:
    """An HTTP tracking server, as opposed to a store on this machine's disk."""
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any trial starts when an HTTP tracking server does not answer ``/health``."""
    if not is_remote(uri):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is unreachable ({problem}). Start it, e.g. "
        f"`mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, "
        f"or leave out --mlflow-uri to use the embedded sqlite store.")


def mlflow_client(uri: str):
    """The one way qstudy opens MLflow: a client that fails fast on an outage and prints no progress bars."""
    from mlflow.tracking import MlflowClient

    fail_fast_on_outage()
    # Its progress bars would land in the middle of the report and the export index on stdout.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The study family's experiment id, created once by the driver (trials racing to create it collide)."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root is not None and not is_remote(uri) else None
    return client.create_experiment(name, artifact_location=location)


def start_study_run(uri: str, experiment_id: str, study: str, params: dict[str, Any]) -> str:
    """The study's parent run; its id is kept in the study state so ``--resume`` reuses it."""
    client = mlflow_client(uri)
    run = client.create_run(experiment_id, run_name=study, tags={STUDY_TAG: study, ROLE_TAG: STUDY_ROLE})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def reopen_study_run(uri: str, run_id: str) -> None:
    """A resumed study's parent run is RUNNING again until the study closes it."""
    client = mlflow_client(uri)
    client.set_tag(run_id, STATUS_TAG, RUNNING)
    client.update_run(run_id, status=RUNNING)


def finish_study_run(uri: str, run_id: str, metrics: dict[str, float], summary: dict, status: str) -> None:
    """Close the parent run; ``metrics`` at step 0, so only a study's final close may log them (once)."""
    from mlflow.entities import Metric

    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    client.log_dict(run_id, summary, SUMMARY_ARTIFACT)
    client.set_tag(run_id, STATUS_TAG, status)
    client.set_terminated(run_id, status=MLFLOW_STATUS.get(status, status))


def log_run_artifacts(uri: str, run_id: str, paths: list[Path], artifact_dir: str) -> None:
    """Files logged on a run under ``artifact_dir`` (``qstudy report``'s dashboards on a study's parent run)."""
    client = mlflow_client(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_dir)


def log_held_out(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """A trial's held-out scores (``qstudy evaluate``) on its own run, beside its val metrics, at step 0.

    An evaluation repeated (other beams) logs newer values at the same step, which MLflow then
    shows as the run's latest; ``tags`` say which split and beams the latest values are from.
    """
    from mlflow.entities import Metric, RunTag

    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_rehearsal(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str], table: dict) -> None:
    """A rehearsal's measurements, estimate and table on its (closed) parent run, at step 0."""
    from mlflow.entities import Metric, RunTag

    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, str(value)) for key, value in tags.items()])
    client.log_dict(run_id, table, REHEARSAL_ARTIFACT)


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(key, encode_param(value)) for key, value in values.items()]


@dataclass(frozen=True)
class TrialTarget:
    """Where a trial's child run lives: picklable, handed from the study driver to the trial."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str
    outbox_root: str  # a directory on each node's own disk (the same path everywhere), one outbox per trial


class TrialTracker:
    """The child run of one trial, written through an outbox that survives server outages."""

    def __init__(self, target: TrialTarget, trial_id: str, run_name: str):
        self.target = target
        self.trial_id = trial_id
        self.run_name = run_name
        self.outbox = Path(target.outbox_root) / trial_id
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._entries = self.outbox / _ENTRIES
        (self.outbox / "run_name").write_text(run_name)  # for the driver's sweep after the study

    # -- what a trial logs ---------------------------------------------------------------------
    def start(self) -> None:
        """The run is RUNNING again: a trial (re)starting after a Ctrl-C closed its run as INTERRUPTED."""
        self._append({"op": "tags", "values": {STATUS_TAG: RUNNING}})
        self._append({"op": "reopen"})

    def log_params(self, params: dict[str, Any]) -> None:
        self._append({"op": "params", "values": params})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log each metric at ``step`` unless it was logged there before (a replayed epoch keeps its first value)."""
        logged = self._logged_steps()
        values = {k: float(v) for k, v in metrics.items() if (k, step) not in logged}
        if values:
            self._append({"op": "metrics", "values": values, "step": step, "timestamp": int(time.time() * 1000)})

    def log_epoch(self, result: dict) -> None:
        """Log one epoch's report (``epoch``, ``loss``, ``epoch_seconds``, ``val_*``) at its epoch's step.

        The other keys of a report are Tune's or logged once per run (``trainable_params``), and
        ``cider`` is ``val_cider`` under the name the searcher optimises.
        """
        self.log_metrics({key: value for key, value in result.items()
                          if key in EPOCH_KEYS or key.startswith(VAL_PREFIX)}, step=int(result[EPOCH]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._append({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path) -> None:
        """Copied into the outbox first: the source may be a temp dir gone by delivery time."""
        kept = self.outbox / "artifacts" / path.name
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, kept)
        self._append({"op": "artifact", "path": str(kept)})

    def finish(self, status: str) -> None:
        self._append({"op": "tags", "values": {STATUS_TAG: status}})
        self._append({"op": "end", "status": MLFLOW_STATUS[status]})
        self.deliver()

    # -- delivery ------------------------------------------------------------------------------
    def _logged_steps(self) -> set[tuple[str, int]]:
        return {(key, entry["step"]) for entry in _entries(self._entries) if entry["op"] == "metrics"
                for key in entry["values"]}

    def _append(self, entry: dict) -> None:
        with self._entries.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        self.deliver()

    def deliver(self) -> bool:
        """Send what MLflow has not acknowledged yet; False (entries kept) when it is unreachable."""
        return deliver_outbox(self.target, self.outbox, self.trial_id, self.run_name)


def _find_or_create_run(client, target: TrialTarget, trial_id: str, run_name: str) -> str:
    runs = client.search_runs(
        [target.experiment_id],
        filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{PARENT_RUN_TAG}` = '{target.parent_run_id}'",
        max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(target.experiment_id, run_name=run_name, tags={
        PARENT_RUN_TAG: target.parent_run_id, STUDY_TAG: target.study, TRIAL_ID_TAG: trial_id, STATUS_TAG: RUNNING})
    return run.info.run_id


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _send(client, run_id: str, entry: dict) -> None:
    from mlflow.entities import Metric, RunTag

    op = entry["op"]
    if op == "params":
        client.log_batch(run_id, params=_params(entry["values"]))
    elif op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, entry["timestamp"], entry["step"])
                                          for k, v in entry["values"].items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in entry["values"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, entry["path"])
    elif op == "reopen":
        client.update_run(run_id, status=RUNNING)
    elif op == "end":
        client.set_terminated(run_id, status=entry["status"])
    else:
        raise ValueError(f"unknown outbox entry {op!r}")


def _record(path: Path, text: str) -> None:
    """Replace ``path``'s text in one rename: a process killed while writing leaves the old text, never an empty file."""
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def deliver_outbox(target: TrialTarget, outbox: Path, trial_id: str, run_name: str) -> bool:
    """Deliver one outbox in order, recording progress after every acknowledged entry."""
    entries_path, sent_path, run_id_path = outbox / _ENTRIES, outbox / "sent", outbox / "run_id"
    entries = _entries(entries_path)
    sent = int(sent_path.read_text()) if sent_path.exists() else 0
    if sent >= len(entries):
        return True
    try:
        client = mlflow_client(target.tracking_uri)
        if not run_id_path.exists():
            _record(run_id_path, _find_or_create_run(client, target, trial_id, run_name))
        run_id = run_id_path.read_text()
        for index in range(sent, len(entries)):
            _send(client, run_id, entries[index])
            _record(sent_path, str(index + 1))
    except Exception as error:  # noqa: BLE001 - any transport or server error: keep the entries, train on
        log.warning("MLflow unreachable for trial %s, %d entries kept in %s: %s",
                    trial_id, len(entries) - sent, outbox, error)
        return False
    return True


def deliver_all(target: TrialTarget, wait_s: float = 0.0) -> int:
    """Sweep every trial's outbox (after the study); retry until ``wait_s`` passes. Returns undelivered count."""
    deadline = time.monotonic() + wait_s
    while True:
        pending = [outbox for outbox in sorted(Path(target.outbox_root).glob("*"))
                   if not deliver_outbox(target, outbox, outbox.name, _run_name(outbox))]
        if not pending or time.monotonic() >= deadline:
            return len(pending)
        time.sleep(5)


def trial_runs(target: TrialTarget) -> dict[str, tuple[str, bool]]:
    """The study's child runs as MLflow has them: trial id -> (run name, still open)."""
    client = mlflow_client(target.tracking_uri)
    runs = client.search_runs([target.experiment_id], max_results=50_000,
                              filter_string=f"tags.`{PARENT_RUN_TAG}` = '{target.parent_run_id}'")
    return {run.data.tags[TRIAL_ID_TAG]: (run.info.run_name, run.info.status == RUNNING) for run in runs}


def close_trial(target: TrialTarget, trial_id: str, run_name: str, status: str, tags: dict[str, str]) -> None:
    """Close a trial's run as ``status`` with ``tags``, opening one first if the trial never did."""
    tracker = TrialTracker(target, trial_id, run_name)
    tracker.set_tags(tags)
    tracker.finish(status)


def close_open_trials(target: TrialTarget, status: str, only: set[str] | None = None,
                      keep: set[str] = frozenset()) -> list[str]:
    """Close every child run still open (``only`` those trials, never those in ``keep``) as ``status``.

    So that no run stays RUNNING forever: after a Ctrl-C the interrupted trials close as
    INTERRUPTED (a resumed trial reopens its run); a driver killed between starting a trial and
    saving Tune's experiment state (every few seconds) leaves a trial that a resumed study never
    sees again, Tune samples a new one in its place, and its run closes as LOST (MLflow status
    KILLED), never counted as a result.
    """
    closed = []
    for trial_id, (run_name, still_open) in sorted(trial_runs(target).items()):
        if not still_open or trial_id in keep or (only is not None and trial_id not in only):
            continue
        TrialTracker(target, trial_id, run_name).finish(status)
        closed.append(trial_id)
    return closed


def mark_stopped(target: TrialTarget, trial_id: str, epochs: int, last_result: dict) -> None:
    """Close a trial's run as STOPPED at the rung of ``epochs`` completed epochs (called by the study driver).

    The trial's own process cannot: Tune ends its thread inside ``tune.report``, before the
    trial logs the epoch it reported (it logs an epoch only once Ray persisted its checkpoint).
    So the driver logs that last epoch from the report, then closes the run after it.
    """
    tracker = TrialTracker(target, trial_id, _run_name(Path(target.outbox_root) / trial_id))
    tracker.log_epoch(last_result)
    tracker.set_tags({STOPPED_AT_TAG: epochs})
    tracker.finish(STOPPED)


def _run_name(outbox: Path) -> str:
    name_file = outbox / "run_name"
    return name_file.read_text() if name_file.exists() else outbox.name
