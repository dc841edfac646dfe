"""Fault tolerance against a real Ray head and MLflow server: a trial that raises, a killed trial, a killed driver.

The drivers run as `qstudy study --address` processes of their own, so a test can kill one
the way a crash would (SIGKILL), and kill a trial's process on the worker node the same way.
A driver killed on nodes that share no disk, its study's storage in S3, is in
test_study_shared_nothing.py.
A trial resumed after a kill must end where it would have without one: its logged curve is
compared, bit for bit, with its config trained in one go (trials train on one thread, as the
references do here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from ray.tune import ExperimentAnalysis
from resume_checks import (StudyFiles, assert_one_story, assert_resumed_curves_as_uninterrupted,
                           assert_resumed_without_repeats, curve, logged_curve, optuna_states, trained_config,
                           trial_state)
from servers import BIN, finish, metric_steps, mlflow_runs, ray_api, study, tiny_space, trial_process, wait_until

from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)


def test_raising_trial_fails_everywhere_and_killed_trial_resumes_from_its_checkpoint(
        ray_head, mlflow_server, study_home, tmp_path):
    """Arm `lora` asks for a batch larger than the training split (a config that passes validation and
    raises when its trial starts); a qadapter trial is SIGKILLed after its first checkpoint and must
    finish from it. The study exits 3: a trial failed."""
    epochs = 3
    space = tiny_space(tmp_path, {"train.epochs": epochs}, trials=3, concurrency=2, sampler="random",
                       seed=10,  # qadapter, qadapter, lora
                       arms={"qadapter": {"adapter.rank": {"choices": [4, 8]}},
                             "lora": {"adapter.rank": 4, "train.batch_size": 1000}})
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
    finish(driver, code=3)

    # Ray: the raising trial errored, the killed one was restarted and terminated normally.
    statuses = [(trial.status, trial.config["method"]) for trial in ExperimentAnalysis(str(tune_dir)).trials]
    assert sorted(statuses) == [("ERROR", "lora"), ("TERMINATED", "qadapter"), ("TERMINATED", "qadapter")]
    # Optuna: the same verdicts.
    assert optuna_states(StudyFiles(study_home, "faults"), tmp_path) == [("COMPLETE", "qadapter"), ("COMPLETE", "qadapter"),
                                                        ("FAIL", "lora")]
    # MLflow: one child run per trial, the raising one FAILED with its error.
    parents, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    faults = [run for run in children if run.data.tags[schema.STUDY_TAG] == "faults"]
    by_trial = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in faults}
    assert len(faults) == len(by_trial) == 3
    failed = [run for run in faults if run.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[schema.STATUS_TAG] == "FAILED"
    assert "train.batch_size 1000" in failed[0].data.tags[schema.ERROR_TAG] and "cider" not in failed[0].data.metrics
    # The killed trial resumed from the newest checkpoint it left (the one before it when the kill
    # caught that one being written, so on disk but not yet registered): its second life trained
    # only the epochs after it.
    resumed = by_trial[killed_trial]
    assert resumed.info.status == "FINISHED" and "cider" in resumed.data.metrics
    restarted_from = int(resumed.data.tags[schema.RESTARTED_FROM_TAG].removeprefix("checkpoint_"))
    assert restarted_from in left and restarted_from >= left[-1] - 1, (restarted_from, left)
    second_life = json.loads((tune_dir.parent / "trials" / killed_trial / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in second_life["epochs"]] == list(range(restarted_from + 1, epochs))
    assert set(metric_steps(mlflow_server.uri, resumed.info.run_id, "val_cider")) == set(range(epochs))


def report_env(ray_head, home: Path) -> dict:
    return {**ray_head.env, "QSTUDY_HOME": str(home)}


def test_interrupted_study_exits_130_closes_every_run_and_resumes_to_one_story(
        ray_head, mlflow_server, study_home, tmp_path):
    """Ctrl-C (SIGINT to the driver) while a trial has two checkpoints and is still training."""
    epochs, trials = 6, 2
    space = tiny_space(tmp_path, {"train.epochs": epochs}, trials=trials, concurrency=2, sampler="random", seed=5)
    driver = study(ray_head, study_home, str(space), "--name", "interrupted", "--mlflow-uri", mlflow_server.uri)
    files = StudyFiles(study_home, "interrupted")

    def checkpointed():
        return any(len(trial["checkpoints"]) >= 2 and not trial["finished"] for trial in trial_state(files).values())

    wait_until(checkpointed, 400, "a trial with two checkpoints", driver)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, output[-5000:]
    assert "interrupted: continue with `qstudy study --resume interrupted`" in output
    assert "Tuner.restore" not in output  # qstudy's is the only resume instruction
    parents, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    (parent,) = [run for run in parents if run.info.run_name == "interrupted"]
    assert parent.info.status == "KILLED" and parent.data.tags[schema.STATUS_TAG] == "INTERRUPTED"
    runs = [run for run in children if run.data.tags[schema.STUDY_TAG] == "interrupted"]
    assert runs and all(run.info.status != "RUNNING" for run in runs)
    assert any(run.data.tags[schema.STATUS_TAG] == "INTERRUPTED" for run in runs)
    before = trial_state(files)
    saved = {trial.trial_id for trial in files.tune_trials()}

    summary = finish(study(ray_head, study_home, "--resume", "interrupted"))
    runs = assert_one_story(report_env(ray_head, study_home), "interrupted", mlflow_server.uri, summary, tmp_path)
    assert assert_resumed_without_repeats(before, saved, runs, files, epochs, mlflow_server.uri) >= 1
    assert assert_resumed_curves_as_uninterrupted(mlflow_server.uri, runs, files, tmp_path) >= 1
    assert sorted(run.data.tags[schema.STATUS_TAG] for run in runs.values()) == ["FINISHED"] * trials


# A Train run's actors: the driver's death takes the first two down; the third, detached, then
# removes the run's placement group (whose CPUs the resumed run needs) and exits.
TRAIN_RUN_ACTORS = ("TrainController", "RayTrainWorker", "PlacementGroupCleaner")


def train_run_actors(ray_head) -> list[str]:
    path = "/api/v0/actors?filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
    actors = ray_api(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"], path)["data"]["result"]["result"]
    return [actor["class_name"] for actor in actors if actor["class_name"] in TRAIN_RUN_ACTORS]


def test_killed_driver_resumes_a_two_worker_deepspeed_trial_to_its_uninterrupted_curve(
        ray_head, mlflow_server, study_home, tmp_path, test_env):
    """Ray Train's path: a TorchTrainer of two DeepSpeed ZeRO-2 ranks, whose driver is SIGKILLed once the
    trial has persisted an epoch before its last. The reference is the same config on two torchrun ranks.
    The DDP case of a two-worker trial is in test_study_distributed.py."""
    epochs = 3
    space = tiny_space(tmp_path, trials=1, concurrency=1, workers_per_trial=2,
                       cpus_per_worker=0.99,  # 2 x 0.99 + the driver's 0.01
                       arms={"qadapter": {"adapter.rank": 8}},
                       overrides={"train.epochs": epochs, "train.deepspeed": True, "train.zero_stage": 2})
    driver = study(ray_head, study_home, str(space), "--name", "zero2-killed", "--mlflow-uri", mlflow_server.uri)
    study_dir = study_home / "studies" / "zero2-killed"

    def registered_before_the_last_epoch():
        # Ray Train's record of the checkpoints it registered, which a restarted run resumes from; a
        # checkpoint whose files are in storage but not yet in it would be trained again.
        records = [json.loads(path.read_text())["latest_checkpoint_result"]
                   for path in study_dir.glob("train/*/checkpoint_manager_snapshot.json")]
        return any(record and record["metrics"][schema.EPOCH] < epochs - 1 for record in records)

    wait_until(registered_before_the_last_epoch, 400, "a registered checkpoint before the last epoch", driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until(lambda: not train_run_actors(ray_head), 180, "the dead driver's Train run to stop")

    summary = finish(study(ray_head, study_home, "--resume", "zero2-killed"))
    runs = assert_one_story(report_env(ray_head, study_home), "zero2-killed", mlflow_server.uri, summary, tmp_path)
    ((trial_id, run),) = runs.items()
    assert run.data.params.items() >= {schema.WORKERS_PARAM: "2", schema.DEEPSPEED_PARAM: "True",
                                       schema.ZERO_STAGE_PARAM: "2"}.items()
    # Ray Train persisted every rank's ZeRO shard of the optimiser state.
    checkpoint = sorted(path for path in study_dir.glob("train/*/checkpoint_*") if path.is_dir())[-1]
    shards = {path.name for path in checkpoint.rglob("*optim_states.pt")}
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards), shards
    second_life = json.loads((study_dir / "trials" / trial_id / "metrics.json").read_text())
    assert 0 < second_life["epochs"][0]["epoch"] and second_life["epochs"][-1]["epoch"] == epochs - 1

    config = {**trained_config(StudyFiles(study_home, "zero2-killed"), trial_id),
              "output_dir": str(tmp_path / "uninterrupted")}
    (tmp_path / "uninterrupted.yaml").write_text(json.dumps(config))
    ranks = subprocess.run([str(BIN / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "qstudy.cli", "train", str(tmp_path / "uninterrupted.yaml")],
                           env=test_env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    expected = curve(json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())["epochs"])
    assert logged_curve(mlflow_server.uri, run.info.run_id, expected) == expected
