"""A real-training tiny study with the MOASHA scheduler: it finishes, and the trials it stopped are tagged as such everywhere."""

from __future__ import annotations

import optuna
import pytest
import yaml
from qstudy.study.search import STOPPED_AT_ATTR
from qstudy.tracking.schema import STOPPED, STOPPED_AT_TAG
from servers import finish, local_study, metric_steps, mlflow_runs, tiny_space
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(600)


def test_real_training_study_with_moasha_tags_its_stopped_trials(study_home, test_env, tmp_path):
    # 4 epochs, one rung at 1 (eta 4). One trial at a time: arrivals in a fixed order, so the
    # same trials stop on every run on a machine; with 4 trials and keep ceil(n/4) = 1 for n <= 4,
    # every trial after the first must beat all before it on the front to go on.
    trials, name = 4, "moasha-real"
    space = tiny_space(tmp_path, trials=trials, concurrency=1, sampler="random", seed=2, scheduler="moasha",
                       grace_epochs=1, reduction_factor=4)
    raw = yaml.safe_load(space.read_text())
    raw["overrides"]["train.epochs"] = 4
    space.write_text(yaml.safe_dump(raw))
    driver, uri = local_study(study_home, test_env, str(space), "--name", name)
    output = finish(driver)

    directory = study_home / "studies" / name
    ot_trials = optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'optuna.db'}").trials
    pruned = [t for t in ot_trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in ot_trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == trials
    assert {t.user_attrs[STOPPED_AT_ATTR] for t in pruned} == {1}
    assert f"{len(complete)} finished" in output and f"{len(pruned)} stopped" in output

    _, children = mlflow_runs(uri, "qadapter-tiny")
    runs = [run for run in children if run.data.tags[schema.STUDY_TAG] == name]
    stopped = [run for run in runs if run.data.tags[schema.STATUS_TAG] == STOPPED]
    assert len(stopped) == len(pruned)
    for run in stopped:
        assert run.info.status == "KILLED" and run.data.tags[STOPPED_AT_TAG] == "1"
        # The rung's epoch is logged; Tune may end the trial's thread before or after it logs the next.
        assert metric_steps(uri, run.info.run_id, "val_cider")[:1] == [0]
    assert all(run.data.tags[schema.STATUS_TAG] == "FINISHED" and "cider" in run.data.metrics
               for run in runs if run not in stopped)
