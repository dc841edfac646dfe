"""A study of the budget-aware sampler and MOASHA on replayed curves through the whole study path, its driver killed
and the study resumed: no config proposed twice by either driver; stopped trials stay off Optuna's and everyone's
front, each stopped once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from qstudy.analysis.report import read_studies
from optuna.trial import TrialState
from qstudy.study.search import STOPPED_AT_ATTR, TRIAL_ID_ATTR
from qstudy.tracking.schema import FINISHED, LOST, STOPPED, STOPPED_AT_TAG
from qstudy.study.budget import config_key
from resume_checks import StudyFiles
from servers import BIN, REPO, SPACES, finish, metric_steps, mlflow_runs, stop
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

TABLE = REPO / "bench" / "data" / "tiny_curves.json"
STARTED_BEFORE_KILL = 4


def _stops(directory: Path) -> dict[str, int]:
    """MOASHA's stops so far (tune trial id -> rung); its state file is replaced whole, never half written."""
    try:
        return json.loads((directory / "scheduler.json").read_text())["stopped"]
    except FileNotFoundError:
        return {}


def kill_at_a_stop_tune_has_not_saved(driver: subprocess.Popen, files: StudyFiles, log: Path,
                                      timeout_s: float = 300) -> None:
    """Once STARTED_BEFORE_KILL trials have started, freeze the driver at each new MOASHA stop and look at Tune's
    saved state: if it still has the stopped trial unfinished, SIGKILL the driver and the local Ray instance it
    started, as a crashed laptop would; else let the driver go on."""
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the first driver exited {driver.returncode}:\n{log.read_text()[-5000:]}"
        stops = _stops(files.study_dir)
        if seen is not None and stops.keys() - seen:
            driver.send_signal(signal.SIGSTOP)  # nothing more reaches Tune's saved state while we read it
            try:
                saved = {trial.trial_id: trial.status for trial in files.tune_trials()}
            except (OSError, ValueError):  # caught in the middle of writing it
                saved = {}
            if any(saved.get(trial_id, "TERMINATED") != "TERMINATED" for trial_id in stops.keys() - seen):
                stop(driver, grace_s=0, sig=signal.SIGKILL)
                return
            driver.send_signal(signal.SIGCONT)
            seen = stops.keys()
        if seen is None and len(list((files.study_dir / "outbox").glob("*"))) >= STARTED_BEFORE_KILL:
            seen = stops.keys()
        time.sleep(0.02)
    raise TimeoutError(f"no stop caught before Tune saved it:\n{log.read_text()[-5000:]}")


def test_budget_sampler_and_moasha_on_replayed_curves_resume_after_a_driver_kill(study_home, test_env, tmp_path):
    """On a local Ray instance with the embedded sqlite store, as a laptop runs it, two trials at a time; the driver
    is killed with its Ray instance, as a crashed laptop would, and the study resumed."""
    trials, name = 12, "replayed-budget"
    space = yaml.safe_load((SPACES / "every_method_tiny.yaml").read_text())  # 10 epochs: rungs at 1 and 3
    space.update(trials=trials, concurrency=2, sampler="budget", seed=1, scheduler="moasha",
                 grace_epochs=1, reduction_factor=3)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    env = {**test_env, "QSTUDY_HOME": str(study_home)}
    files = StudyFiles(study_home, name)
    directory = files.study_dir
    log = tmp_path / "killed-driver.log"
    with log.open("w") as out:
        # Tune's state saved every 0.25 s: a replayed trial lives about a second, so most are in it when stopped.
        driver = subprocess.Popen([str(BIN / "qstudy"), "study", str(path), "--name", name, "--replay", str(TABLE)],
                                  env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "0.25"}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        kill_at_a_stop_tune_has_not_saved(driver, files, log)  # the stopped trial is resumed as unfinished
    output = finish(subprocess.Popen([str(BIN / "qstudy"), "study", "--resume", name], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    uri = f"sqlite:///{study_home / 'mlflow' / 'mlflow.db'}"

    # Every trial a different config: neither driver proposed one that was running or had run.
    storage = f"sqlite:///{directory / 'optuna.db'}"
    ot_trials = optuna.load_study(study_name=name, storage=storage).trials
    keys = [config_key(t.params) for t in ot_trials]
    assert len(keys) == len(set(keys)) >= trials, keys
    by_id = {t.user_attrs[TRIAL_ID_ATTR]: t for t in ot_trials}
    tuned = {trial.trial_id for trial in files.tune_trials()}
    assert len(tuned) == trials and tuned <= by_id.keys()

    stops = _stops(directory)  # tune trial id -> rung
    assert stops and set(stops.values()) <= {1, 3}
    # A trial stopped at a rung never reached a later one: stopped once, by the first driver or the second.
    rung_tables = json.loads((directory / "scheduler.json").read_text())["rungs"]
    assert not [entry[0] for entry in rung_tables["3"] if stops.get(entry[0]) == 1]
    # Each trial Tune ran, across both drivers, told once: MOASHA's stops PRUNED in Optuna at their rung and STOPPED in
    # MLflow with that many epochs logged and no final CIDEr; the others COMPLETE and FINISHED after 10 epochs.
    _, children = mlflow_runs(uri, "every-method-tiny")
    runs = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in children if run.data.tags[schema.STUDY_TAG] == name}
    assert tuned <= runs.keys()
    for trial_id in tuned:
        ot, run, epochs = by_id[trial_id], runs[trial_id], metric_steps(uri, runs[trial_id].info.run_id, "val_cider")
        if trial_id in stops:
            rung = stops[trial_id]
            assert ot.state == TrialState.PRUNED and ot.user_attrs[STOPPED_AT_ATTR] == rung and ot.values is None
            assert run.data.tags[schema.STATUS_TAG] == STOPPED and run.info.status == "KILLED"
            assert run.data.tags[STOPPED_AT_TAG] == str(rung) and epochs == list(range(rung)), (trial_id, epochs)
            assert "cider" not in run.data.metrics
        else:
            assert ot.state == TrialState.COMPLETE and run.data.tags[schema.STATUS_TAG] == FINISHED
            assert epochs == list(range(10)), (trial_id, epochs)
    # A trial the dead driver started after Tune last saved its state is not run again: it stays as that driver told
    # it, or, caught before it was told, is LOST in MLflow and failed in Optuna.
    told = {FINISHED: TrialState.COMPLETE, STOPPED: TrialState.PRUNED, LOST: TrialState.FAIL}
    for trial_id in runs.keys() - tuned:
        assert told[runs[trial_id].data.tags[schema.STATUS_TAG]] == by_id[trial_id].state, trial_id

    # The summary (the parent run's summary.json and the printed line) and `qstudy report` agree.
    pruned = [t for t in ot_trials if t.state == TrialState.PRUNED]
    complete = [t for t in ot_trials if t.state == TrialState.COMPLETE]
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
