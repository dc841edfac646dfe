"""A trial on two Ray Train workers training with DeepSpeed ZeRO-2 over gloo: the GPU cluster's path, on CPU.

The first DeepSpeed start on a machine compiles its CPU communication op (~1 min);
TORCH_EXTENSIONS_DIR keeps it in the test cache for later sessions.
"""

from __future__ import annotations

import pytest
import yaml
from servers import finish, metric_steps, mlflow_runs, study, tiny_space
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)


def test_two_worker_deepspeed_trial_checkpoints_every_rank(ray_head, mlflow_server, study_home, tmp_path):
    space = tiny_space(tmp_path, trials=1, concurrency=1, cpus_per_worker=0.99,  # 2 x 0.99 + the driver's 0.01
                       arms={"qadapter": {"adapter.rank": 8}})
    raw = yaml.safe_load(space.read_text())
    raw["overrides"].update({"train.deepspeed": True, "train.zero_stage": 2})
    space.write_text(yaml.safe_dump(raw))
    finish(study(ray_head, study_home, str(space), "--name", "zero2", "--workers-per-trial", "2",
                 "--mlflow-uri", mlflow_server.uri))

    _, children = mlflow_runs(mlflow_server.uri, "qadapter-tiny")
    (run,) = [run for run in children if run.data.tags[schema.STUDY_TAG] == "zero2"]
    assert run.info.status == "FINISHED" and "cider" in run.data.metrics
    assert run.data.params["workers"] == "2" and run.data.params["deepspeed"] == "True"
    assert run.data.params["zero_stage"] == "2"
    assert metric_steps(mlflow_server.uri, run.info.run_id, "val_cider") == [0, 1]  # rank 0 logged, once per epoch
    # Ray Train persisted one checkpoint per epoch holding both ranks' ZeRO optimizer shards.
    trial_id = run.data.tags[schema.TRIAL_ID_TAG]
    run_dir = study_home / "studies" / "zero2" / "train" / f"train-{trial_id}"
    checkpoints = sorted(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    assert checkpoints
    shards = {path.name for path in checkpoints[-1].rglob("*optim_states.pt")}
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards), shards
