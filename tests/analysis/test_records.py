"""Trials read back from a real MLflow sqlite store that the study engine's tracking code wrote."""

import pytest

from qstudy.analysis.pareto import pareto_front
from qstudy.records import from_mlflow
from qstudy.tracking.reader import StudyNotFound, client_for, find_study, load_trial_runs
from qstudy.tracking.schema import FINISHED


def load_records(client, studies):
    return from_mlflow(load_trial_runs(client, studies))


@pytest.fixture(scope="module")
def client(mlflow_store):
    return client_for(mlflow_store[0])


def test_records_come_back_typed_in_completion_order(client, mlflow_store, main_trials, finish_order):
    uri, parents = mlflow_store
    study = find_study(client, "unit-study")
    assert study.parent_run_id == parents["unit-study"] and study.base_total_params == 120_000_000
    records = load_records(client, [study])

    assert [r.trial_id for r in records] == finish_order
    assert [r.order for r in records] == list(range(len(finish_order)))
    by_id = {r.trial_id: r for r in records}
    for trial_id, trial in main_trials.items():
        record = by_id[trial_id]
        assert record.study == "unit-study" and record.method == trial.method and record.status == trial.status
        assert record.params == trial.hyper  # only the sampled hyperparameters, with their types back
        assert record.cider == (pytest.approx(trial.cider) if trial.cider is not None else None)
        assert record.trainable_params == trial.trainable
        assert record.total_params == (trial.measured_total if trial.status == FINISHED else None)
        assert record.run_id is not None
    assert by_id["t2"].params["adapter.insertion_layers"] == [2, 3]  # JSON list, not the text "[2, 3]"
    assert isinstance(by_id["t1"].params["adapter.rank"], int)
    assert by_id["t1"].params["train.learning_rate"] == pytest.approx(1e-3)
    # The restarted trial re-logged epoch 1: the writer logs a step once, so its first value stands.
    assert by_id["t1"].epoch_cider == pytest.approx((0.25, 0.31, 0.34))
    assert by_id["t5"].epoch_cider == pytest.approx((0.30, 0.38, 0.41))
    assert by_id["t7"].epoch_cider == ()
    assert not by_id["t6"].is_valid and not by_id["t7"].is_valid
    assert [r.trial_id for r in pareto_front(records)] == ["t0", "t1", "t2", "t5"]


def test_studies_combine_in_one_completion_order(client):
    studies = [find_study(client, "unit-study"), find_study(client, "unit-baselines")]
    records = load_records(client, studies)
    assert [r.trial_id for r in records] == ["t1", "b0", "t0", "t3", "t2", "t6", "t4", "b1", "t7", "t5"]
    assert {r.study for r in records if r.trial_id.startswith("b")} == {"unit-baselines"}
    # The full fine-tuning baseline joins the front; the cheap LoRA baseline pushes Q-Adapter t1 off it.
    assert [r.trial_id for r in pareto_front(records)] == ["t0", "b1", "t2", "t5", "b0"]


def test_study_found_by_parent_run_id(client, mlflow_store):
    parent = mlflow_store[1]["unit-baselines"]
    assert find_study(client, parent).name == "unit-baselines"


def test_unknown_study_lists_the_known_ones(client):
    with pytest.raises(StudyNotFound, match=r"no study 'nope'.*: empty, twice, unit-baselines, unit-study$"):
        find_study(client, "nope")


def test_two_parent_runs_of_one_name_are_ambiguous(client, mlflow_store):
    with pytest.raises(StudyNotFound, match="2 parent runs") as error:
        find_study(client, "twice")
    assert all(run_id in str(error.value) for run_id in mlflow_store[1]["twice"])
    assert find_study(client, mlflow_store[1]["twice"][1]).parent_run_id == mlflow_store[1]["twice"][1]


def test_an_empty_study_has_no_records(client):
    assert load_records(client, [find_study(client, "empty")]) == []
