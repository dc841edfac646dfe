"""Checks of a resumed study: one story in MLflow, the summary and `qstudy report`; no epoch trained or logged twice.

A study's files are read through :class:`StudyFiles`: on the session cluster they are on the
one disk both raylets share; on the shared-nothing cluster the trials' working files are on
the worker node's private disk (read with nsenter), the driver's on the head's, and Tune's
state and checkpoints in S3.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from servers import BIN, metric_steps, mlflow_runs
from shared_nothing import SharedNothingCluster, on, read_on

from qstudy.config import RunConfig
from qstudy.study.storage import EPOCH_METRICS
from qstudy.tracking import schema
from qstudy.train import recipe
from qstudy.train.engine import cpu_threads


@dataclass(frozen=True)
class StudyFiles:
    """Where a test reads study ``name`` of QSTUDY_HOME ``home``; ``cluster``: the shared-nothing one, else one disk."""

    home: Path
    name: str
    cluster: SharedNothingCluster | None = None

    @property
    def study_dir(self) -> Path:
        return self.home / "studies" / self.name

    def trial_text(self, trial_id: str, name: str) -> str | None:
        """A file of the trial's outputs (``trials/ID/``) or outbox (``outbox/ID/``), on the node it trained on."""
        kind = "outbox" if name == "entries.jsonl" else "trials"
        path = self.study_dir / kind / trial_id / name
        if self.cluster is None:
            return path.read_text() if path.exists() else None
        try:
            return read_on(self.cluster.worker_pid, path)
        except FileNotFoundError:
            return None

    def checkpoints(self) -> dict[str, list[int]]:
        """Per trial Tune knows of, the epochs its checkpoints in storage (Tune's trial dirs) hold, each read from the
        checkpoint's own record: a restarted trial's checkpoints are numbered anew, so a name is no epoch."""
        if self.cluster is None:
            return {trial.name.removeprefix("trial_"): sorted(
                json.loads(record.read_text())["epoch"] for record in trial.glob(f"checkpoint_*/{EPOCH_METRICS}"))
                for trial in (self.study_dir / "tune").glob("trial_*")}
        found: dict[str, list[int]] = {}
        for key in self.cluster.s3_keys(f"{self.name}/tune/trial_"):
            trial, _, rest = key.removeprefix(f"{self.name}/tune/trial_").partition("/")
            epochs = found.setdefault(trial, [])
            if rest.startswith("checkpoint_") and rest.endswith(f"/{EPOCH_METRICS}"):
                epochs.append(json.loads(self.cluster.s3_text(key))["epoch"])
        return {trial: sorted(epochs) for trial, epochs in found.items()}

    def tune_trials(self):
        """Tune's saved experiment state: its trials."""
        from ray.tune import ExperimentAnalysis

        if self.cluster is None:
            return ExperimentAnalysis(str(self.study_dir / "tune")).trials
        from pyarrow.fs import S3FileSystem

        storage = self.cluster.storage
        filesystem = S3FileSystem(access_key=storage.credentials["aws_access_key_id"],
                                  secret_key=storage.credentials["aws_secret_access_key"], region="us-east-1",
                                  endpoint_override=storage.endpoint.removeprefix("http://"), scheme="http")
        return ExperimentAnalysis(f"{storage.bucket}/studies/{self.name}/tune", storage_filesystem=filesystem).trials

    def driver_copy(self, name: str, into: Path) -> Path:
        """A copy of a file in the driver's study directory (the head's disk on the shared-nothing cluster)."""
        copy = into / name
        if self.cluster is None:
            shutil.copyfile(self.study_dir / name, copy)
        else:
            assert on(self.cluster.head_pid, "cp", str(self.study_dir / name), str(copy)).returncode == 0
        return copy


def optuna_states(files: StudyFiles, tmp_path: Path) -> list[tuple[str, str]]:
    database = files.driver_copy("optuna.db", tmp_path)
    trials = optuna.load_study(study_name=files.name, storage=f"sqlite:///{database}").trials
    return sorted((trial.state.name, trial.user_attrs.get("method", "")) for trial in trials)


def curve(epochs: list[dict]) -> dict[str, dict[int, float]]:
    """Per-epoch metrics as a trial logs them, by MLflow key and step, from a run's ``metrics.json`` epochs."""
    logged: dict[str, dict[int, float]] = {schema.LOSS: {}}
    for epoch in epochs:
        logged[schema.LOSS][epoch["epoch"]] = epoch["train_loss"]
        for name, value in epoch["val"].items():
            logged.setdefault(f"{schema.VAL_PREFIX}{name}", {})[epoch["epoch"]] = value
    return logged


def logged_curve(uri: str, run_id: str, keys) -> dict[str, dict[int, float]]:
    client = MlflowClient(uri)
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def trained_config(files: StudyFiles, trial_id: str) -> dict:
    """The run config a trial trained, as its ``metrics.json`` keeps it."""
    return json.loads(files.trial_text(trial_id, "metrics.json"))["config"]


def uninterrupted_curve(config: dict, output_dir: Path) -> dict[str, dict[int, float]]:
    """The curve of ``config`` trained in one go in this process, on one thread as the trials train."""
    with cpu_threads(1):
        result = recipe.run(RunConfig.from_dict({**config, "output_dir": str(output_dir)}), progress=False)
    return curve(result.to_dict()["epochs"])


def assert_resumed_curves_as_uninterrupted(uri: str, runs: dict, files: StudyFiles, tmp_path: Path) -> int:
    """Every finished trial that restarted from a checkpoint logged, epoch by epoch, the very metrics its
    config gives trained without a break. Returns how many trials that covered."""
    resumed = [trial_id for trial_id, run in runs.items()
               if schema.RESTARTED_FROM_TAG in run.data.tags and run.data.tags[schema.STATUS_TAG] == "FINISHED"]
    for trial_id in resumed:
        expected = uninterrupted_curve(trained_config(files, trial_id), tmp_path / f"uninterrupted-{trial_id}")
        assert logged_curve(uri, runs[trial_id].info.run_id, expected) == expected, trial_id
    return len(resumed)


def _restarted_from(entries: str | None) -> str | None:
    """The checkpoint a trial's outbox last says it restarted from (None: it never restarted)."""
    tags = [json.loads(line)["values"] for line in (entries or "").splitlines() if '"op": "tags"' in line]
    return next((values[schema.RESTARTED_FROM_TAG] for values in reversed(tags) if schema.RESTARTED_FROM_TAG in values),
                None)


def trial_state(files: StudyFiles) -> dict[str, dict]:
    """Per trial: whether it closed its run FINISHED, its checkpoints, its outputs, and where it last restarted from.

    A trial that has just started may have its outbox before Tune made its directory, or the reverse.
    """
    trials = {}
    checkpoints = files.checkpoints()
    started = set(checkpoints)
    if files.cluster is None:
        started |= {path.name for path in (files.study_dir / "outbox").glob("*")}
    for trial_id in started:
        entries = files.trial_text(trial_id, "entries.jsonl")
        trials[trial_id] = {
            "finished": entries is not None and f'"{schema.STATUS_TAG}": "{schema.FINISHED}"' in entries,
            "checkpoints": checkpoints.get(trial_id, []),
            "outputs": files.trial_text(trial_id, "metrics.json"),
            "restarted_from": _restarted_from(entries)}
    return trials


def _report(env: dict, name: str, uri: str, out: Path) -> str:
    report = subprocess.run([str(BIN / "qstudy"), "report", name, "--mlflow-uri", uri, "--no-png", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return report.stdout


def assert_one_story(env: dict, name: str, uri: str, summary: str, tmp_path: Path) -> dict:
    """The summary, the parent run and `qstudy report` (run with ``env``) agree on every trial's status and the best
    CIDEr; no run is left open and no metric step was logged twice. Returns the child runs by trial id."""
    parents, children = mlflow_runs(uri, "qadapter-tiny")
    (parent,) = [run for run in parents if run.info.run_name == name]
    runs = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in children if run.data.tags[schema.STUDY_TAG] == name}
    assert len(runs) == len([run for run in children if run.data.tags[schema.STUDY_TAG] == name])
    statuses = {trial_id: run.data.tags[schema.STATUS_TAG] for trial_id, run in runs.items()}
    assert all(run.info.status != "RUNNING" for run in runs.values()) and "RUNNING" not in statuses.values()
    client = MlflowClient(uri)
    for run in runs.values():
        for key in run.data.metrics:
            steps = metric_steps(uri, run.info.run_id, key)
            assert len(steps) == len(set(steps)), (run.data.tags[schema.TRIAL_ID_TAG], key, steps)

    parent_summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert {trial["trial_id"]: trial["status"] for trial in parent_summary["trials"]} == statuses
    counts = Counter(statuses.values())
    said = ", ".join(f"{count} {status.lower()}" for status, count in sorted(counts.items()))
    report = _report(env, name, uri, tmp_path / "report")
    assert f"study {name}: {said} in " in summary and f"{len(runs)} trials: {said}" in report
    best_id, best = max(((trial_id, run.data.metrics["cider"]) for trial_id, run in runs.items()
                         if statuses[trial_id] == "FINISHED"), key=lambda pair: pair[1])
    assert f"best CIDEr: {best:.4f} (trial {best_id})" in summary
    assert re.search(rf"best CIDEr: .*\(trial {best_id}\): CIDEr {best:.4f}", report)
    assert client.get_run(parent.info.run_id).data.metrics["best_cider"] == pytest.approx(best)
    assert parent.info.status == "FINISHED" and parent.data.tags[schema.STATUS_TAG] == "FINISHED"
    return runs


def assert_resumed_without_repeats(before: dict, saved: set[str], runs: dict, files: StudyFiles, epochs: int,
                                   uri: str) -> int:
    """Each trial Tune's saved state knew continued from where it was: a trained one was not trained
    again, one with checkpoints resumed from the newest it persisted (the newest in storage, or the one
    before it when the kill caught that one being written). Returns how many trials that covered."""
    covered = 0
    for trial_id, state in before.items():
        run = runs.get(trial_id)
        if run is None:  # its actor started but its function never did: no work to resume
            continue
        after = files.trial_text(trial_id, "metrics.json")
        if state["finished"]:
            restarted_since = run.data.tags.get(schema.RESTARTED_FROM_TAG) != state["restarted_from"]
            assert after == state["outputs"] and not restarted_since, trial_id
            covered += trial_id in saved
        elif state["checkpoints"] and trial_id in saved and run.data.tags[schema.STATUS_TAG] == "FINISHED":
            # Its last life trained the epochs after the checkpoint it restarted from, to the end (none after the last
            # epoch's), and that checkpoint held the newest epoch persisted before the kill, or the one before it.
            resumed = [epoch["epoch"] for epoch in json.loads(after)["epochs"]]
            first = resumed[0] if resumed else epochs
            assert resumed == list(range(first, epochs)), (trial_id, resumed)
            assert first - 1 >= state["checkpoints"][-1] - 1, (trial_id, resumed, state["checkpoints"])
            covered += schema.RESTARTED_FROM_TAG in run.data.tags
        if run.data.tags[schema.STATUS_TAG] == "FINISHED":
            assert set(metric_steps(uri, run.info.run_id, "val_cider")) == set(range(epochs)), trial_id
    return covered
