"""The trial outbox: while the tracking server is down a trial logs on; once MLflow answers, nothing is lost."""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace

from mlflow.tracking import MlflowClient
from qstudy.tracking import schema, writer
from qstudy.study.storage import StudyStorage
from servers import SPACES, free_port


def test_outbox_keeps_a_trial_during_an_outage_and_delivers_it_once(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = writer.ensure_experiment(store, "outage", tmp_path / "artifacts")
    parent = writer.start_study_run(store, experiment, "study", {"trials": 1})
    down = writer.TrialTarget(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_id=experiment,
                              parent_run_id=parent, study="study", outbox_root=str(tmp_path / "outbox"))
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(b"weights")

    started = time.monotonic()
    tracker = writer.TrialTracker(down, "trial-1", "qadapter-trial-1")
    tracker.log_params({"adapter.rank": 8, "adapter.insertion_layers": [1, 3]})
    for epoch, cider in enumerate((0.5, 0.9)):
        tracker.log_metrics({"val_cider": cider}, step=epoch)
    tracker.log_artifact(weights)
    weights.unlink()  # a trial's temporary files are gone by the time the server is back
    tracker.finish(schema.FINISHED)
    assert time.monotonic() - started < 30  # refused connections, no minutes of retries
    client = MlflowClient(store)
    assert len(client.search_runs([experiment])) == 1  # only the parent: the trial is all in the outbox

    back = dataclasses.replace(down, tracking_uri=store)
    assert writer.deliver_all(back) == 0
    assert writer.deliver_all(back) == 0  # a second sweep sends nothing twice
    (run,) = [run for run in client.search_runs([experiment]) if run.info.run_id != parent]
    assert run.data.tags[schema.PARENT_RUN_TAG] == parent and run.info.run_name == "qadapter-trial-1"
    assert run.info.status == "FINISHED" and run.data.tags[schema.STATUS_TAG] == "FINISHED"
    assert run.data.params == {"adapter.rank": "8", "adapter.insertion_layers": "[1, 3]"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_cider")] == [(0, 0.5), (1, 0.9)]
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["adapter.safetensors"]


def test_a_resumed_trial_logs_each_step_once_and_reopens_its_interrupted_run(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = writer.ensure_experiment(store, "resume", tmp_path / "artifacts")
    parent = writer.start_study_run(store, experiment, "study", {"trials": 2})
    target = writer.TrialTarget(tracking_uri=store, experiment_id=experiment, parent_run_id=parent, study="study",
                                outbox_root=str(tmp_path / "outbox"))
    first = writer.TrialTracker(target, "trial-1", "qadapter-trial-1")
    first.log_metrics({"val_cider": 0.5, "loss": 2.0}, step=0)
    writer.TrialTracker(target, "trial-2", "qadapter-trial-2").finish(schema.FINISHED)
    # Ctrl-C: the open run closes INTERRUPTED, the finished one is left alone.
    assert writer.close_open_trials(target, schema.INTERRUPTED) == ["trial-1"]
    client = MlflowClient(store)
    runs = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in client.search_runs([experiment])
            if run.info.run_id != parent}
    assert (runs["trial-1"].info.status, runs["trial-1"].data.tags[schema.STATUS_TAG]) == ("KILLED", "INTERRUPTED")
    assert runs["trial-2"].info.status == "FINISHED"

    resumed = writer.TrialTracker(target, "trial-1", "qadapter-trial-1")  # the trial's next life
    resumed.start()
    assert client.get_run(runs["trial-1"].info.run_id).info.status == "RUNNING"
    resumed.log_metrics({"val_cider": 0.7, "loss": 1.0}, step=0)  # replayed from its checkpoint
    resumed.log_metrics({"val_cider": 0.9}, step=1)
    resumed.finish(schema.FINISHED)
    history = client.get_metric_history(runs["trial-1"].info.run_id, "val_cider")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.9)]
    assert client.get_run(runs["trial-1"].info.run_id).info.status == "FINISHED"
    assert writer.close_open_trials(target, schema.LOST) == []


def test_the_driver_leaves_no_run_open_and_no_errored_trial_without_one(tmp_path):
    """A trial Tune failed before its function ran (its reused actor was dead) opened no run; the
    driver gives it a FAILED one. Unfinished trials close INTERRUPTED, unknown ones LOST."""
    from ray.tune.experiment import Trial

    from qstudy.study.tuner import _close_trial_runs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = writer.ensure_experiment(store, "closing", tmp_path / "artifacts")
    parent = writer.start_study_run(store, experiment, "study", {"trials": 4})
    target = writer.TrialTarget(tracking_uri=store, experiment_id=experiment, parent_run_id=parent, study="study",
                                outbox_root=str(tmp_path / "outbox"))
    for trial_id in ("done", "running", "unknown"):
        writer.TrialTracker(target, trial_id, f"qadapter-{trial_id}").log_params({"adapter.rank": 4})
    writer.TrialTracker(target, "done", "qadapter-done").finish(schema.FINISHED)
    trials = [SimpleNamespace(trial_id=trial_id, status=status, config={"method": "qadapter"})
              for trial_id, status in (("done", Trial.TERMINATED), ("running", Trial.RUNNING),
                                       ("dead-actor", Trial.ERROR))]
    _close_trial_runs(target, trials)

    runs = {run.data.tags[schema.TRIAL_ID_TAG]: run for run in MlflowClient(store).search_runs([experiment])
            if run.info.run_id != parent}
    assert {trial_id: (run.data.tags[schema.STATUS_TAG], run.info.status) for trial_id, run in runs.items()} == {
        "done": ("FINISHED", "FINISHED"), "running": ("INTERRUPTED", "KILLED"), "unknown": ("LOST", "KILLED"),
        "dead-actor": ("FAILED", "FAILED")}
    assert runs["dead-actor"].data.tags[schema.METHOD_TAG] == "qadapter"
    assert runs["dead-actor"].data.tags[schema.PARENT_RUN_TAG] == parent


def test_the_summary_and_the_report_count_a_resumed_trial_alike(tmp_path, capsys):
    """A trial Ctrl-C closed INTERRUPTED and ``--resume`` finished is one finished trial in the study's summary
    and in ``qstudy report``, beside one that failed."""
    from qstudy.cli import main
    from qstudy.study.tuner import StudyState, format_summary, read_summary

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = writer.ensure_experiment(store, "family", tmp_path / "artifacts")
    parent = writer.start_study_run(store, experiment, "resumed", {schema.BASE_TOTAL_PARAM: 1_000})
    target = writer.TrialTarget(tracking_uri=store, experiment_id=experiment, parent_run_id=parent, study="resumed",
                                outbox_root=str(tmp_path / "outbox"))
    first_life = writer.TrialTracker(target, "trial-1", "qadapter-trial-1")
    first_life.start()
    first_life.log_epoch({schema.EPOCH: 0, schema.VAL_CIDER: 0.5, schema.LOSS: 2.0})
    writer.TrialTracker(target, "trial-2", "qadapter-trial-2").finish(schema.FAILED)
    assert writer.close_open_trials(target, schema.INTERRUPTED) == ["trial-1"]
    resumed = writer.TrialTracker(target, "trial-1", "qadapter-trial-1")
    resumed.start()
    resumed.log_epoch({schema.EPOCH: 1, schema.VAL_CIDER: 0.7, schema.LOSS: 1.0})
    resumed.log_metrics({schema.CIDER: 0.7, schema.TRAINABLE_PARAMS: 10, schema.TOTAL_PARAMS: 1_010}, step=1)
    resumed.finish(schema.FINISHED)

    state = StudyState(name="resumed", space_origin=str(tmp_path / "space.yaml"), tracking_uri=store,
                       experiment_id=experiment, parent_run_id=parent, optuna_storage="", force_trainer=False,
                       storage=str(tmp_path))
    summary = read_summary(state, tmp_path, StudyStorage(str(tmp_path), "resumed"), "family", wall_seconds=1.0,
                           interrupted=False)
    assert format_summary(summary).splitlines()[0] == "study resumed: 1 failed, 1 finished in 1 s"
    assert main(["report", "resumed", "--mlflow-uri", store, "--out", str(tmp_path / "dashboards"), "--no-png"]) == 0
    assert "2 trials: 1 failed, 1 finished" in capsys.readouterr().out
    assert {record.trial_id: record.status for record in summary.records} == {"trial-1": "FINISHED",
                                                                              "trial-2": "FAILED"}


def test_a_delivery_killed_while_recording_its_progress_resumes_where_it_was(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = writer.ensure_experiment(store, "killed", tmp_path / "artifacts")
    parent = writer.start_study_run(store, experiment, "study", {"trials": 1})
    target = writer.TrialTarget(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_id=experiment,
                                parent_run_id=parent, study="study", outbox_root=str(tmp_path / "outbox"))
    tracker = writer.TrialTracker(target, "trial-1", "qadapter-trial-1")  # server down: all in the outbox
    for epoch in range(3):
        tracker.log_metrics({schema.VAL_CIDER: 0.1 * epoch}, step=epoch)
    target = dataclasses.replace(target, tracking_uri=store)

    write_text = writer.Path.write_text

    def killed_after_truncating(path, text, *args, **kwargs):  # what a kill mid-write leaves behind
        if path.name.startswith("sent"):
            write_text(path, "")
            raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(writer.Path, "write_text", killed_after_truncating)
    try:
        writer.deliver_all(target)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()

    assert writer.deliver_all(target) == 0
    (run,) = [run for run in MlflowClient(store).search_runs([experiment]) if run.info.run_id != parent]
    history = MlflowClient(store).get_metric_history(run.info.run_id, schema.VAL_CIDER)
    assert sorted(metric.step for metric in history) == [0, 1, 2]  # each step once


def test_a_study_resumed_elsewhere_uses_the_tracking_uri_it_is_given(study_home, monkeypatch, capsys):
    """A study moved to a new cluster: ``--resume`` takes the new server's URI (here one that does not answer,
    so the resume stops there, before Ray) and keeps the study's own record as it was until the checks pass."""
    from qstudy.cli import main

    directory = study_home / "studies" / "moved"
    directory.mkdir(parents=True)
    state = {"name": "moved", "space_origin": str(SPACES / "qadapter_tiny.yaml"), "tracking_uri": "http://10.0.0.5:5000",
             "experiment_id": "1", "parent_run_id": "r", "optuna_storage": "sqlite:///optuna.db",
             "force_trainer": False, "replay_table": None, "storage": "s3://old-bucket/studies"}
    (directory / "study.json").write_text(json.dumps(state))
    (directory / "space.yaml").write_text((SPACES / "qadapter_tiny.yaml").read_text())
    monkeypatch.setenv("QSTUDY_HOME", str(study_home))
    moved = f"http://127.0.0.1:{free_port()}"
    assert main(["study", "--resume", "moved", "--mlflow-uri", moved, "--storage", "s3://new-bucket/studies"]) == 2
    assert f"MLflow tracking server {moved} is unreachable" in capsys.readouterr().err
    assert json.loads((directory / "study.json").read_text()) == state
