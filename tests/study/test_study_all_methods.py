"""search_spaces/all_methods_tiny.yaml through the study engine: every registered method trains as an arm of one study."""

from __future__ import annotations

import pytest
from servers import SPACES, finish, mlflow_runs, study

from qstudy.methods import ADAPTERS
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)


def test_every_registered_method_finishes_as_an_arm(ray_head, mlflow_server, study_home):
    finish(study(ray_head, study_home, str(SPACES / "all_methods_tiny.yaml"), "--name", "all-arms",
                 "--mlflow-uri", mlflow_server.uri))

    _, children = mlflow_runs(mlflow_server.uri, "all-methods-tiny")
    runs = [run for run in children if run.data.tags[schema.STUDY_TAG] == "all-arms"]
    assert len(runs) == 9  # the file's trials: one per arm, since the study enqueues each arm first
    finished = {run.data.params["method"] for run in runs
                if run.info.status == "FINISHED" and "cider" in run.data.metrics}
    assert finished == set(ADAPTERS)
