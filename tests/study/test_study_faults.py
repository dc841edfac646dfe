"""Fault tolerance against a real Ray head and MLflow server: a trial that raises, a killed trial, a killed driver.

The drivers run as `qstudy study --address` processes of their own, so a test can kill one
the way a crash would (SIGKILL), and kill a trial's process on the worker node the same way.
A trial resumed after a kill must end where it would have without one: its logged curve is
compared, bit for bit, with its config trained in one go (trials train on one thread, as the
references do here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from servers import BIN, finish, metric_steps, mlflow_runs, ray_api, study, tiny_space, trial_process, wait_until
from qstudy.config import RunConfig
from qstudy.tracking import schema
from qstudy.train import recipe
from qstudy.train.engine import cpu_threads

pytestmark = pytest.mark.timeout(600)


def optuna_states(directory: Path, name: str) -> list[tuple[str, str]]:
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'optuna.db'}").trials
    return sorted((trial.state.name, trial.user_attrs.get("method", "")) for trial in trials)


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
    assert optuna_states(tune_dir.parent, "faults") == [("COMPLETE", "qadapter"), ("COMPLETE", "qadapter"),
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


def trained_config(study_dir: Path, trial_id: str) -> dict:
    """The run config a trial trained, as its ``metrics.json`` keeps it."""
    return json.loads((study_dir / "trials" / trial_id / "metrics.json").read_text())["config"]


def uninterrupted_curve(config: dict, output_dir: Path) -> dict[str, dict[int, float]]:
    """The curve of ``config`` trained in one go in this process, on one thread as the trials train."""
    with cpu_threads(1):
        result = recipe.run(RunConfig.from_dict({**config, "output_dir": str(output_dir)}), progress=False)
    return curve(result.to_dict()["epochs"])


def assert_resumed_curves_as_uninterrupted(uri: str, runs: dict, study_dir: Path, tmp_path: Path) -> int:
    """Every finished trial that restarted from a checkpoint logged, epoch by epoch, the very metrics its
    config gives trained without a break. Returns how many trials that covered."""
    resumed = [trial_id for trial_id, run in runs.items()
               if schema.RESTARTED_FROM_TAG in run.data.tags and run.data.tags[schema.STATUS_TAG] == "FINISHED"]
    for trial_id in resumed:
        expected = uninterrupted_curve(trained_config(study_dir, trial_id), tmp_path / f"uninterrupted-{trial_id}")
        assert logged_curve(uri, runs[trial_id].info.run_id, expected) == expected, trial_id
    return len(resumed)


def _restarted_from(entries: Path) -> str | None:
    """The checkpoint a trial's outbox last says it restarted from (None: it never restarted)."""
    tags = [json.loads(line)["values"] for line in entries.read_text().splitlines()
            if '"op": "tags"' in line] if entries.exists() else []
    return next((values[schema.RESTARTED_FROM_TAG] for values in reversed(tags) if schema.RESTARTED_FROM_TAG in values),
                None)


def _trial_state(study_dir: Path) -> dict[str, dict]:
    """Per trial on disk: whether it closed its run FINISHED, its checkpoints, its outputs' bytes, and where it
    last restarted from.

    A trial that has just started may have its outbox before Tune made its directory, or the reverse.
    """
    trials = {}
    started = {path.name for path in (study_dir / "outbox").glob("*")}
    for trial_id in started | {path.name.removeprefix("trial_") for path in (study_dir / "tune").glob("trial_*")}:
        trial_dir = study_dir / "tune" / f"trial_{trial_id}"
        entries = study_dir / "outbox" / trial_id / "entries.jsonl"
        outputs = study_dir / "trials" / trial_id / "metrics.json"
        trials[trial_id] = {
            "finished": entries.exists() and f'"{schema.STATUS_TAG}": "{schema.FINISHED}"' in entries.read_text(),
            "checkpoints": sorted(int(path.name.removeprefix("checkpoint_")) for path in trial_dir.glob("checkpoint_*")),
            "outputs": outputs.read_bytes() if outputs.exists() else None,
            "restarted_from": _restarted_from(entries)}
    return trials


def _report(ray_head, home: Path, name: str, uri: str, out: Path) -> str:
    report = subprocess.run([str(BIN / "qstudy"), "report", name, "--mlflow-uri", uri, "--no-png", "--out", str(out)],
                            env={**ray_head.env, "QSTUDY_HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return report.stdout


def assert_one_story(ray_head, home: Path, name: str, uri: str, summary: str, tmp_path: Path) -> dict:
    """The summary, the parent run and `qstudy report` agree on every trial's status and the best CIDEr;
    no run is left open and no metric step was logged twice. Returns the child runs by trial id."""
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
    report = _report(ray_head, home, name, uri, tmp_path / "report")
    assert f"study {name}: {said} in " in summary and f"{len(runs)} trials: {said}" in report
    best_id, best = max(((trial_id, run.data.metrics["cider"]) for trial_id, run in runs.items()
                         if statuses[trial_id] == "FINISHED"), key=lambda pair: pair[1])
    assert f"best CIDEr: {best:.4f} (trial {best_id})" in summary
    assert re.search(rf"best CIDEr: .*\(trial {best_id}\): CIDEr {best:.4f}", report)
    assert client.get_run(parent.info.run_id).data.metrics["best_cider"] == pytest.approx(best)
    assert parent.info.status == "FINISHED" and parent.data.tags[schema.STATUS_TAG] == "FINISHED"
    return runs


def assert_resumed_without_repeats(before: dict, saved: set[str], runs: dict, study_dir: Path, epochs: int,
                                   uri: str) -> int:
    """Each trial Tune's saved state knew continued from where it was: a trained one was not trained
    again, one with checkpoints resumed from the newest it persisted (the newest on disk, or the one
    before it when the kill caught that one being written). Returns how many trials that covered."""
    covered = 0
    for trial_id, state in before.items():
        run = runs.get(trial_id)
        if run is None:  # its actor started but its function never did: no work to resume
            continue
        after = study_dir / "trials" / trial_id / "metrics.json"
        if state["finished"]:
            restarted_since = run.data.tags.get(schema.RESTARTED_FROM_TAG) != state["restarted_from"]
            assert after.read_bytes() == state["outputs"] and not restarted_since, trial_id
            covered += trial_id in saved
        elif state["checkpoints"] and trial_id in saved and run.data.tags[schema.STATUS_TAG] == "FINISHED":
            tag = run.data.tags.get(schema.RESTARTED_FROM_TAG)
            restarted = int(tag.removeprefix("checkpoint_")) if tag else -1  # -1: trained from scratch
            assert restarted >= state["checkpoints"][-1] - 1, (trial_id, restarted, state["checkpoints"])
            # Its second life trained only the epochs after that checkpoint (its first life's checkpoint_N is epoch N).
            resumed = [epoch["epoch"] for epoch in json.loads(after.read_text())["epochs"]]
            assert resumed == list(range(restarted + 1, epochs)), (trial_id, restarted, resumed)
            covered += restarted >= 0
        if run.data.tags[schema.STATUS_TAG] == "FINISHED":
            assert set(metric_steps(uri, run.info.run_id, "val_cider")) == set(range(epochs)), trial_id
    return covered


def kill_driver(driver: subprocess.Popen, ray_head, study_dir: Path) -> tuple[dict, set[str]]:
    """SIGKILL the driver; once its trials have stopped, what is on disk and which trials Tune's saved state knew."""
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    wait_until(lambda: all(trial_process(ray_head.worker_session, trial_id) is None
                           for trial_id in _trial_state(study_dir)), 60, "the dead driver's trials to stop")
    return _trial_state(study_dir), {trial.trial_id for trial in ExperimentAnalysis(str(study_dir / "tune")).trials}


def test_killed_driver_resumes_trials_from_their_checkpoints_and_repeats_nothing(
        ray_head, mlflow_server, study_home, tmp_path):
    """SIGKILL the driver once one trial has finished and another has two checkpoints, and the resumed
    driver once it has checkpointed an epoch more; Tune saves its experiment state every 10 s here, as
    Ray does by default, so it lags the trials."""
    epochs, trials = 8, 3
    space = tiny_space(tmp_path, {"train.epochs": epochs}, trials=trials, concurrency=2, sampler="random", seed=4)
    lagging = {"TUNE_GLOBAL_CHECKPOINT_S": "10"}
    driver = study(ray_head, study_home, str(space), "--name", "killed", "--mlflow-uri", mlflow_server.uri, env=lagging)
    study_dir = study_home / "studies" / "killed"

    def one_trained_one_checkpointed():
        state = _trial_state(study_dir)
        return (any(trial["finished"] for trial in state.values())
                and any(len(trial["checkpoints"]) >= 2 and not trial["finished"] for trial in state.values()))

    wait_until(one_trained_one_checkpointed, 400, "a finished trial beside one with two checkpoints", driver)
    first, first_saved = kill_driver(driver, ray_head, study_dir)

    def resumable_and_trained_on():
        """A trial Tune's saved state knows, with a checkpoint the first driver's trials had not left, and an epoch
        to go."""
        known = {trial.trial_id for trial in ExperimentAnalysis(str(study_dir / "tune")).trials}
        return any(trial_id in known and not trial["finished"] and trial["checkpoints"][-1] < epochs - 1
                   and set(trial["checkpoints"]) - set(first.get(trial_id, {}).get("checkpoints", []))
                   for trial_id, trial in _trial_state(study_dir).items() if trial["checkpoints"])

    driver = study(ray_head, study_home, "--resume", "killed", env=lagging)
    wait_until(resumable_and_trained_on, 400, "a known trial with a new checkpoint and an epoch to go", driver)
    second, second_saved = kill_driver(driver, ray_head, study_dir)

    summary = finish(study(ray_head, study_home, "--resume", "killed"))
    runs = assert_one_story(ray_head, study_home, "killed", mlflow_server.uri, summary, tmp_path)
    for before, saved in [(first, first_saved), (second, second_saved)]:
        assert assert_resumed_without_repeats(before, saved, runs, study_dir, epochs, mlflow_server.uri) >= 1
    assert assert_resumed_curves_as_uninterrupted(mlflow_server.uri, runs, study_dir, tmp_path) >= 1
    states = optuna_states(study_dir, "killed")
    assert [state for state, _ in states].count("COMPLETE") == trials and "RUNNING" not in dict(states)
    # Trials a dead driver had started but Tune's saved state never knew are not resumed: Tune
    # trains others in their place. Those that had trained stay FINISHED, the others close as LOST.
    ran = {trial.trial_id for trial in ExperimentAnalysis(str(study_dir / "tune")).trials}
    assert len(ran) == trials and ran <= set(runs)
    for trial_id in set(runs) - ran:
        expected = ("FINISHED", "FINISHED") if second[trial_id]["finished"] else ("LOST", "KILLED")
        assert (runs[trial_id].data.tags[schema.STATUS_TAG], runs[trial_id].info.status) == expected, trial_id


def test_interrupted_study_exits_130_closes_every_run_and_resumes_to_one_story(
        ray_head, mlflow_server, study_home, tmp_path):
    """Ctrl-C (SIGINT to the driver) while a trial has two checkpoints and is still training."""
    epochs, trials = 8, 2
    space = tiny_space(tmp_path, {"train.epochs": epochs}, trials=trials, concurrency=2, sampler="random", seed=5)
    driver = study(ray_head, study_home, str(space), "--name", "interrupted", "--mlflow-uri", mlflow_server.uri)
    study_dir = study_home / "studies" / "interrupted"

    def checkpointed():
        return any(len(trial["checkpoints"]) >= 2 and not trial["finished"] for trial in _trial_state(study_dir).values())

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
    before = _trial_state(study_dir)
    saved = {trial.trial_id for trial in ExperimentAnalysis(str(study_dir / "tune")).trials}

    summary = finish(study(ray_head, study_home, "--resume", "interrupted"))
    runs = assert_one_story(ray_head, study_home, "interrupted", mlflow_server.uri, summary, tmp_path)
    assert assert_resumed_without_repeats(before, saved, runs, study_dir, epochs, mlflow_server.uri) >= 1
    assert assert_resumed_curves_as_uninterrupted(mlflow_server.uri, runs, study_dir, tmp_path) >= 1
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
    runs = assert_one_story(ray_head, study_home, "zero2-killed", mlflow_server.uri, summary, tmp_path)
    ((trial_id, run),) = runs.items()
    assert run.data.params.items() >= {schema.WORKERS_PARAM: "2", schema.DEEPSPEED_PARAM: "True",
                                       schema.ZERO_STAGE_PARAM: "2"}.items()
    # Ray Train persisted every rank's ZeRO shard of the optimiser state.
    checkpoint = sorted(path for path in study_dir.glob("train/*/checkpoint_*") if path.is_dir())[-1]
    shards = {path.name for path in checkpoint.rglob("*optim_states.pt")}
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards), shards
    second_life = json.loads((study_dir / "trials" / trial_id / "metrics.json").read_text())
    assert 0 < second_life["epochs"][0]["epoch"] and second_life["epochs"][-1]["epoch"] == epochs - 1

    config = {**trained_config(study_dir, trial_id), "output_dir": str(tmp_path / "uninterrupted")}
    (tmp_path / "uninterrupted.yaml").write_text(json.dumps(config))
    ranks = subprocess.run([str(BIN / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "qstudy.cli", "train", str(tmp_path / "uninterrupted.yaml")],
                           env=test_env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    expected = curve(json.loads((tmp_path / "uninterrupted" / "metrics.json").read_text())["epochs"])
    assert logged_curve(mlflow_server.uri, run.info.run_id, expected) == expected
