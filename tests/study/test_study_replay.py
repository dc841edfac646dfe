"""A study of the budget-aware sampler and MOASHA on replayed curves through the whole study path: no config proposed
twice; stopped trials stay off Optuna's and everyone's front."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from qstudy.analysis.report import read_studies
from qstudy.study.search import STOPPED_AT_ATTR
from qstudy.tracking.schema import STOPPED, STOPPED_AT_TAG
from qstudy.study.budget import config_key
from servers import BIN, REPO, SPACES, finish, metric_steps, mlflow_runs
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

TABLE = REPO / "bench" / "data" / "tiny_curves.json"


def test_budget_sampler_and_moasha_on_replayed_curves(study_home, test_env, tmp_path):
    """On a local Ray instance with the embedded sqlite store, as a laptop runs it, two trials at a time."""
    trials, name = 12, "replayed-budget"
    space = yaml.safe_load((SPACES / "every_method_tiny.yaml").read_text())  # 10 epochs: rungs at 1 and 3
    space.update(trials=trials, concurrency=2, sampler="budget", seed=1, scheduler="moasha",
                 grace_epochs=1, reduction_factor=3)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    output = finish(subprocess.Popen([str(BIN / "qstudy"), "study", str(path), "--name", name, "--replay", str(TABLE)],
                                     env={**test_env, "QSTUDY_HOME": str(study_home)}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    uri = f"sqlite:///{study_home / 'mlflow' / 'mlflow.db'}"

    # Every trial a different config: the sampler never proposed one that was running or had run.
    storage = f"sqlite:///{study_home / 'studies' / name / 'optuna.db'}"
    ot_trials = optuna.load_study(study_name=name, storage=storage).trials
    keys = [config_key(t.params) for t in ot_trials]
    assert len(keys) == len(set(keys)) == trials, keys

    directory = study_home / "studies" / name
    stopped_by_scheduler = json.loads((directory / "scheduler.json").read_text())["stopped"]  # tune trial id -> rung
    assert stopped_by_scheduler and set(stopped_by_scheduler.values()) <= {1, 3}

    # Optuna: every stopped trial PRUNED with its rung, every other one COMPLETE with its 10th epoch's CIDEr.
    pruned = [t for t in ot_trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in ot_trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(pruned) == len(stopped_by_scheduler) and len(pruned) + len(complete) == trials
    assert sorted(t.user_attrs[STOPPED_AT_ATTR] for t in pruned) == sorted(stopped_by_scheduler.values())
    assert all(t.values is None for t in pruned)

    # MLflow: the same trials closed STOPPED at the same rung, with that many epochs logged.
    _, children = mlflow_runs(uri, "every-method-tiny")
    runs = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in children if run.data.tags[schema.STUDY_TAG] == name}
    assert len(runs) == trials
    for trial_id, run in runs.items():
        epochs = metric_steps(uri, run.info.run_id, "val_cider")
        if trial_id in stopped_by_scheduler:
            rung = stopped_by_scheduler[trial_id]
            assert run.data.tags[schema.STATUS_TAG] == STOPPED and run.info.status == "KILLED"
            assert run.data.tags[STOPPED_AT_TAG] == str(rung) and epochs == list(range(rung))
            assert "cider" not in run.data.metrics  # no final CIDEr for a low-fidelity trial
        else:
            assert run.data.tags[schema.STATUS_TAG] == "FINISHED" and epochs == list(range(10))

    # The summary (the parent run's summary.json and the printed line) and `qstudy report` agree.
    parent = next(run for run in mlflow_runs(uri, "every-method-tiny")[0]
                  if run.data.tags[schema.STUDY_TAG] == name)
    summary = json.loads(Path(MlflowClient(uri).download_artifacts(
        parent.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert parent.data.metrics["trials_stopped"] == len(pruned)
    assert f"{len(complete)} finished" in output and f"{len(pruned)} stopped" in output
    report = read_studies([name], uri).analysis
    statuses = sorted(record.status for record in report.records)
    assert statuses == sorted(record["status"] for record in summary["trials"])
    assert statuses.count(STOPPED) == len(pruned)
    front = sorted((record.cider, record.trainable_params) for record in report.front)
    assert front == sorted((record["cider"], record["trainable_params"]) for record in summary["front"])
    assert all(record.status == "FINISHED" for record in report.front)
