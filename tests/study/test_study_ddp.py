"""A trial on two Ray Train workers with plain PyTorch DDP over gloo (no DeepSpeed): each rank trains half an epoch."""

from __future__ import annotations

import json

import pytest
from servers import finish, metric_steps, mlflow_runs, study, tiny_space

from qstudy.data.annotations import read_clips
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

BATCH = 48  # clips per step and rank: a few steps per epoch, so the world size shows in their number


def test_two_worker_ddp_trial_splits_each_epoch_between_the_ranks(ray_head, mlflow_server, study_home, tmp_path):
    space = tiny_space(tmp_path, trials=1, concurrency=1, cpus_per_worker=0.99,  # 2 x 0.99 + the driver's 0.01
                       arms={"qadapter": {"adapter.rank": 8}},
                       overrides={"train.epochs": 1, "train.batch_size": BATCH, "train.max_steps_per_epoch": None})
    finish(study(ray_head, study_home, str(space), "--name", "ddp", "--workers-per-trial", "2",
                 "--mlflow-uri", mlflow_server.uri))

    _, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    (run,) = [run for run in children if run.data.tags[schema.STUDY_TAG] == "ddp"]
    assert run.info.status == "FINISHED" and "cider" in run.data.metrics
    assert run.data.params["workers"] == "2" and run.data.params["deepspeed"] == "False"
    assert metric_steps(mlflow_server.uri, run.info.run_id, "val_cider") == [0]  # rank 0 logged, once
    trial_id = run.data.tags[schema.TRIAL_ID_TAG]
    metrics = json.loads((study_home / "studies" / "ddp" / "trials" / trial_id / "metrics.json").read_text())
    data = metrics["config"]["data"]
    clips = len(read_clips(data["format"], data["annotations"], data["video_dir"], "train"))
    assert metrics["epochs"][0]["train_steps"] == clips // (2 * BATCH) < clips // BATCH
    run_dir = study_home / "studies" / "ddp" / "train" / f"train-{trial_id}"
    checkpoints = sorted(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    assert checkpoints and (checkpoints[-1] / "trainable.safetensors").exists()  # rank 0's, persisted by Ray Train
