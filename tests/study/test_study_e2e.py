"""A tiny study submitted with `ray job submit` to a real two-node Ray cluster, tracked by a real `mlflow server`."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from qstudy.cli import main
from qstudy.tracking.schema import NODE_TAG
from servers import BIN, REPO, SPACES, free_port, metric_steps, mlflow_runs, ray_api, tiny_space
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)


def test_submitted_study_lands_in_mlflow(ray_head, mlflow_server, study_home, corrupt_target_data, tmp_path):
    trials = 4
    # The design study's space, its sampler and seed as shipped, its training cut to tiny_space's
    # seconds per trial, on data with a corrupt video: its arms first (Q-Adapter, frozen, LoRA),
    # then one more trial.
    raw = yaml.safe_load((SPACES / "qadapter_design.yaml").read_text())
    raw["overrides"] = {**yaml.safe_load(tiny_space(tmp_path).read_text())["overrides"],
                        "data.annotations": str(corrupt_target_data / "annotations.json"),
                        "data.video_dir": str(corrupt_target_data / "videos")}
    space = tmp_path / "qadapter_design.yaml"
    space.write_text(yaml.safe_dump(raw))
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env_cpu.yaml").read_text())
    runtime_env["env_vars"]["QSTUDY_HOME"] = str(study_home)
    started = time.monotonic()
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--submission-id", "qstudy-e2e",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "jobs/study.py", str(space), "--trials", str(trials), "--mlflow-uri", mlflow_server.uri,
         "--name", "e2e"],
        env=ray_head.env, capture_output=True, text=True, timeout=540)
    print(f"ray job submit: {time.monotonic() - started:.0f} s")
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    # The head has no CPUs, as in ray_cluster.yaml: the job's supervisor, which starts the study's
    # driver, runs there (an entrypoint that asks for no resources is pinned to the head), every
    # trial on the worker node (checked per run below).
    details = ray_api(ray_head.dashboard, ray_head.env["RAY_AUTH_TOKEN"], "/api/jobs/qstudy-e2e")
    assert details["status"] == "SUCCEEDED" and details["driver_node_id"] == ray_head.head_node

    parents, children = mlflow_runs(mlflow_server.uri, raw["study"])  # the study family's experiment
    parents = [run for run in parents if run.data.tags[schema.STUDY_TAG] == "e2e"]  # other tests share the server
    children = [run for run in children if run.data.tags[schema.STUDY_TAG] == "e2e"]
    assert len(parents) == 1 and parents[0].info.run_name == "e2e" and parents[0].info.status == "FINISHED"
    assert len(children) == trials
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags[schema.STATUS_TAG] == "FINISHED"
        assert run.data.tags[NODE_TAG] == ray_head.worker_node != ray_head.head_node
        assert run.data.metrics["cider"] >= 0 and run.data.metrics["trainable_params"] > 0
        assert run.data.metrics["total_params"] > run.data.metrics["trainable_params"]
        assert metric_steps(mlflow_server.uri, run.info.run_id, "val_cider") == [0, 1]  # one per epoch
        assert "train.learning_rate" in run.data.params
    assert {run.data.params["method"] for run in children} == {"qadapter", "frozen", "lora"}

    # Optuna never suggested rank to a reading that has none (nor gating to one without a gate).
    ot_trials = optuna.load_study(study_name="e2e", storage=f"sqlite:///{study_home / 'studies' / 'e2e' / 'optuna.db'}"
                                  ).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    readings = [trial.params for trial in ot_trials if trial.params["method"] == "qadapter"]
    placements = {reading["qadapter.adapter.placement"] for reading in readings}
    assert placements - {"side"}, placements  # at least one rank-free reading, or the check below proves nothing
    for reading in readings:
        placement = reading["qadapter.adapter.placement"]
        assert ("qadapter.adapter.rank" in reading) == (placement == "side"), reading
        assert ("qadapter.adapter.gating" in reading) == (placement != "sequence"), reading
    artifacts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(children[0].info.run_id)}
    assert {"adapter.safetensors", "config.yaml", "metrics.json"} <= artifacts
    # The server proxies them (no trial holds S3 credentials) and keeps them in its S3 bucket.
    run = children[0].info
    assert run.artifact_uri.startswith("mlflow-artifacts:/") and "AWS_SECRET_ACCESS_KEY" not in ray_head.env
    keys = mlflow_server.artifacts.keys(f"mlflow/{run.experiment_id}/{run.run_id}/")
    stored = {key.rpartition("/")[2] for key in keys}
    assert artifacts <= stored

    # The frame cache: the driver decoded each split once, before any trial (Ray forwards the
    # trials' output to the job's, so a trial that decoded would log the corrupt video again);
    # every trial mapped the same entries and reports the same unreadable video.
    cache = study_home / "cache"
    assert len(list(cache.glob("*/index.json"))) == 2 and not list(cache.glob("*.partial"))  # train, val
    skipped = [json.loads(path.read_text())["skipped_videos"]
               for path in (study_home / "studies" / "e2e" / "trials").glob("*/metrics.json")]
    assert len(skipped) == trials and all(videos == skipped[0] for videos in skipped)
    (broken,) = skipped[0]
    assert Path(broken["path"]).read_bytes() == b"not an mp4 at all"
    assert (job.stdout + job.stderr).count(f"skipping video {broken['path']}") == 1


def test_unreachable_mlflow_server_fails_fast(study_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSTUDY_HOME", str(study_home))
    started = time.monotonic()
    code = main(["study", str(tiny_space(tmp_path)), "--mlflow-uri", f"http://127.0.0.1:{free_port()}"])
    assert code == 2
    assert time.monotonic() - started < 20
    error = capsys.readouterr().err
    assert "MLflow tracking server http://127.0.0.1:" in error and "unreachable" in error
    assert not ray.is_initialized() and not (study_home / "studies").exists()
