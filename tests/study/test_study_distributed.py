"""A trial on two Ray Train workers over gloo with plain PyTorch DDP.

Each rank trains half of every epoch, rank 0 alone logs, and Ray Train persists each epoch's
checkpoint. DeepSpeed ZeRO-2 on two Ray Train workers (the GPU cluster's path, on CPU) is
tested where its driver is killed and resumed (test_study_faults.py), on the same data split.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servers import finish, metric_steps, mlflow_runs, study, tiny_space

from qstudy.data.annotations import read_clips
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

BATCH = 48  # clips per step and rank: a few steps per epoch, so the world size shows in their number


def rank_0_weights(checkpoint: Path) -> bool:
    return (checkpoint / "trainable.safetensors").exists()


def test_a_two_worker_trial_splits_each_epoch_and_checkpoints(ray_head, mlflow_server, study_home, tmp_path):
    engine = "ddp"
    space = tiny_space(tmp_path, trials=1, concurrency=1, cpus_per_worker=0.99,  # 2 x 0.99 + the driver's 0.01
                       arms={"qadapter": {"adapter.rank": 8}},
                       overrides={"train.epochs": 1, "train.batch_size": BATCH, "train.max_steps_per_epoch": None})
    finish(study(ray_head, study_home, str(space), "--name", engine, "--workers-per-trial", "2",
                 "--mlflow-uri", mlflow_server.uri))

    _, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    (run,) = [run for run in children if run.data.tags[schema.STUDY_TAG] == engine]
    assert run.info.status == "FINISHED" and schema.CIDER in run.data.metrics
    assert run.data.params.items() >= {schema.WORKERS_PARAM: "2", schema.DEEPSPEED_PARAM: "False"}.items()
    assert metric_steps(mlflow_server.uri, run.info.run_id, schema.VAL_CIDER) == [0]  # rank 0 logged, once
    trial_id = run.data.tags[schema.TRIAL_ID_TAG]
    metrics = json.loads((study_home / "studies" / engine / "trials" / trial_id / "metrics.json").read_text())
    data = metrics["config"]["data"]
    clips = len(read_clips(data["format"], data["annotations"], data["video_dir"], "train"))
    assert metrics["epochs"][0]["train_steps"] == clips // (2 * BATCH) < clips // BATCH
    run_dir = study_home / "studies" / engine / "train" / f"train-{trial_id}"
    checkpoints = sorted(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    assert checkpoints and rank_0_weights(checkpoints[-1])
