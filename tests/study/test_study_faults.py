"""Fault tolerance against a real Ray head and MLflow server: a trial that raises, a killed trial, a killed driver.

The drivers run as `qstudy study --address` processes of their own, so a test can kill one
the way a crash would (SIGKILL), and kill a trial's process on the worker node the same way.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import optuna
import pytest
import yaml
from ray.tune import ExperimentAnalysis
from servers import finish, metric_steps, mlflow_runs, study, tiny_space, trial_process, wait_until

pytestmark = pytest.mark.timeout(600)


def optuna_states(directory: Path, name: str) -> list[tuple[str, str]]:
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'optuna.db'}").trials
    return sorted((trial.state.name, trial.user_attrs.get("method", "")) for trial in trials)


def test_raising_trial_fails_everywhere_and_killed_trial_resumes_from_its_checkpoint(
        ray_head, mlflow_server, study_home, tmp_path):
    """Arm `lora` reads annotations that do not exist (a config that genuinely raises); a
    qadapter trial is SIGKILLed after its first checkpoint and must finish from it."""
    epochs = 3
    space = tiny_space(tmp_path, trials=3, concurrency=2, sampler="random", seed=10,  # qadapter, qadapter, lora
                       arms={"qadapter": {"adapter.rank": {"choices": [4, 8]}},
                             "lora": {"adapter.rank": 4, "data.annotations": str(tmp_path / "missing.json")}})
    raw = yaml.safe_load(space.read_text())
    raw["overrides"]["train.epochs"] = epochs
    space.write_text(yaml.safe_dump(raw))
    driver = study(ray_head, study_home, str(space), "--name", "faults", "--mlflow-uri", mlflow_server.uri)
    tune_dir = study_home / "studies" / "faults" / "tune"

    def checkpointed_running_trial():
        for trial_dir in tune_dir.glob("trial_*"):
            if (trial_dir / "checkpoint_000000").exists() and not (trial_dir / f"checkpoint_{epochs - 1:06d}").exists():
                trial_id = trial_dir.name.removeprefix("trial_")
                pid = trial_process(ray_head.worker_session, trial_id)
                if pid is not None:
                    return trial_id, pid
        return None

    killed_trial, pid = wait_until(checkpointed_running_trial, 300, "a trial with its first checkpoint", driver)
    os.kill(pid, signal.SIGKILL)
    # A tiny epoch is shorter than the look-up above, so the dead process may have left a later
    # checkpoint than the one that was seen; Ray needs seconds to restart it, so this is its legacy.
    left = sorted(int(path.name.removeprefix("checkpoint_")) for path in (tune_dir / f"trial_{killed_trial}").glob("checkpoint_*"))
    finish(driver)

    # Ray: the raising trial errored, the killed one was restarted and terminated normally.
    statuses = [(trial.status, trial.config["method"]) for trial in ExperimentAnalysis(str(tune_dir)).trials]
    assert sorted(statuses) == [("ERROR", "lora"), ("TERMINATED", "qadapter"), ("TERMINATED", "qadapter")]
    # Optuna: the same verdicts.
    assert optuna_states(tune_dir.parent, "faults") == [("COMPLETE", "qadapter"), ("COMPLETE", "qadapter"),
                                                        ("FAIL", "lora")]
    # MLflow: one child run per trial, the raising one FAILED with its error.
    parents, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    faults = [run for run in children if run.data.tags["qstudy.study"] == "faults"]
    by_trial = {run.data.tags["qstudy.trial_id"]: run for run in faults}
    assert len(faults) == len(by_trial) == 3
    failed = [run for run in faults if run.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["qstudy.status"] == "FAILED"
    assert "data.annotations" in failed[0].data.tags["qstudy.error"] and "cider" not in failed[0].data.metrics
    # The killed trial resumed from the newest checkpoint it left (the one before it when the kill
    # caught that one being written, so on disk but not yet registered): its second life trained
    # only the epochs after it.
    resumed = by_trial[killed_trial]
    assert resumed.info.status == "FINISHED" and "cider" in resumed.data.metrics
    restarted_from = int(resumed.data.tags["qstudy.restarted_from"].removeprefix("checkpoint_"))
    assert restarted_from in left and restarted_from >= left[-1] - 1, (restarted_from, left)
    second_life = json.loads((tune_dir.parent / "trials" / killed_trial / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in second_life["epochs"]] == list(range(restarted_from + 1, epochs))
    assert set(metric_steps(mlflow_server.uri, resumed.info.run_id, "val_cider")) == set(range(epochs))


def test_killed_driver_resumes_without_losing_or_duplicating_trials(ray_head, mlflow_server, study_home, tmp_path):
    trials = 3
    space = tiny_space(tmp_path, trials=trials, concurrency=2, sampler="tpe")
    driver = study(ray_head, study_home, str(space), "--name", "resumed", "--mlflow-uri", mlflow_server.uri)
    outbox = study_home / "studies" / "resumed" / "outbox"

    def one_trial_closed():
        return any('"op": "end"' in path.read_text() for path in outbox.glob("*/entries.jsonl"))

    wait_until(one_trial_closed, 300, "the first finished trial", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(2)  # let Ray notice the driver's death and release its trials

    output = finish(study(ray_head, study_home, "--resume", "resumed"))
    assert "study resumed:" in output
    states = optuna_states(study_home / "studies" / "resumed", "resumed")
    assert [state for state, _ in states].count("COMPLETE") == trials
    parents, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    assert len([run for run in parents if run.info.run_name == "resumed"]) == 1
    runs = [run for run in children if run.data.tags["qstudy.study"] == "resumed"]
    assert len(runs) == len({run.data.tags["qstudy.trial_id"] for run in runs})  # no trial has two runs
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert len(finished) == trials and all("cider" in run.data.metrics for run in finished)
    # A trial the dead driver had started but not yet saved in Tune's state is closed, never left RUNNING.
    assert all(run.info.status == "KILLED" and run.data.tags["qstudy.status"] == "LOST"
               for run in runs if run.info.status != "FINISHED")
