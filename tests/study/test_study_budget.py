"""A live study with a parameter budget: the arm over it is recorded infeasible and never trained, the other trains."""

from __future__ import annotations

import pytest
from servers import finish, local_study, metric_steps, mlflow_runs, tiny_space
from shapes import tiny_dims

from qstudy.methods import adapter_config_from_mapping
from qstudy.tracking.schema import FINISHED, INFEASIBLE, STATUS_TAG
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)

BIG_QADAPTER = {"num_query_tokens": 16, "insertion_layers": "all", "gating": "sigmoid", "rank": 32}


def test_the_arm_over_budget_is_infeasible_and_never_trains(study_home, test_env, tmp_path):
    dims = tiny_dims()
    frozen = adapter_config_from_mapping({"method": "frozen"}).count_trainable(dims)
    big = adapter_config_from_mapping({"method": "qadapter", **BIG_QADAPTER}).count_trainable(dims)
    budget = (frozen + big) // 2
    arms = {"frozen": {}, "qadapter": {f"adapter.{key}": value for key, value in BIG_QADAPTER.items()}}
    space = tiny_space(tmp_path, trials=2, concurrency=2, sampler="random", seed=0, parameter_budget=budget, arms=arms,
                       overrides={"train.epochs": 1})
    driver, uri = local_study(study_home, test_env, str(space), "--name", "budget")
    output = finish(driver)

    _, children = mlflow_runs(uri, "qadapter-tiny")
    runs = {run.data.params["method"]: run for run in children if run.data.tags[schema.STUDY_TAG] == "budget"}
    assert set(runs) == {"frozen", "qadapter"}  # each arm once: the study enqueues every arm first
    over, under = runs["qadapter"], runs["frozen"]
    assert over.data.tags[STATUS_TAG] == INFEASIBLE and over.data.params["over_budget"] == "True"
    assert over.data.metrics["trainable_params"] == big > budget  # the closed form, logged before training
    assert metric_steps(uri, over.info.run_id, "val_cider") == []
    trials = study_home / "studies" / "budget" / "trials"
    assert not (trials / over.data.tags[schema.TRIAL_ID_TAG] / "adapter.safetensors").exists()
    assert under.data.tags[STATUS_TAG] == FINISHED and under.data.params["over_budget"] == "False"
    assert under.data.metrics["trainable_params"] == frozen <= budget and "cider" in under.data.metrics
    assert (trials / under.data.tags[schema.TRIAL_ID_TAG] / "adapter.safetensors").exists()
    assert "1 finished, 1 infeasible" in output
