"""`qstudy report` on studies in a real MLflow store: the printed analysis and the dashboards on the parent run."""

import re

import pytest

from qstudy.tracking.reader import client_for
from qstudy.cli import main

VIEW_NAMES = ("epoch_curves", "hypervolume", "parallel_coordinates", "pareto")


def report(capsys, *args):
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def artifact_names(uri, run_id, path):
    return sorted(artifact.path.rpartition("/")[2] for artifact in client_for(uri).list_artifacts(run_id, path))


def test_report_prints_the_analysis_and_logs_dashboards_on_the_parent_run(capsys, mlflow_store, tmp_path):
    uri, parents = mlflow_store
    code, out, _ = report(
        capsys,
        "unit-study",
        "--mlflow-uri",
        uri,
        "--budget",
        "0.7%",
        "--reference",
        "0.1,10M",
        "--out",
        str(tmp_path / "dash"),
        "--no-png",
    )
    assert code == 0
    assert "8 trials: 1 failed, 6 finished, 1 infeasible" in out
    assert "Pareto front (val CIDEr max, trainable parameters min): 4 of 6 finished trials" in out
    table = out[out.index("trial  method") : out.index("hypervolume:")].strip().splitlines()
    assert [row.split()[0] for row in table[2:]] == ["t0", "t1", "t2", "t5"]
    assert table[4].endswith("*")  # the knee: t2
    assert "r=16" in table[3] and "0.3400" in table[3] and "650,000" in table[3] and "0.539%" in table[3]
    # By hand, reference (CIDEr 0.1, 10M params): the front's steps dominate
    # (10M-600k)*0.11 + (10M-650k)*0.13 + (10M-900k)*0.04 + (10M-8M)*0.03 = 2,673,500.
    assert "hypervolume: 2.6735e+06 (reference point: CIDEr 0.1, 10,000,000 trainable params" in out
    # t1 finished first: (10M-650k)*(0.34-0.1) = 2,244,000 of the box (0.41-0.1)*10M = 3.1M; t5 last.
    shares = re.search(r"after each trial, in completion order: (.*)", out).group(1).split()
    assert shares[0] == "0.724" and shares[-1] == "0.862" and len(shares) == 8
    assert re.search(r"knee: qadapter .*\(trial t2\): CIDEr 0\.3800, 900,000 trainable params", out)
    assert "best CIDEr: lora alpha=64 r=32 both lr=0.0003 (trial t5): CIDEr 0.4100" in out
    # 0.7% of 120M = 840,000: t2 (900k) no longer fits, t1 does.
    assert "best under budget 0.7% (840,000 params): qadapter" in out and "(trial t1)" in out
    assert f"under dashboards/ of parent run {parents['unit-study']}" in out
    assert sorted(path.name for path in (tmp_path / "dash").iterdir()) == [f"{v}.html" for v in VIEW_NAMES]
    assert {f"{v}.html" for v in VIEW_NAMES} <= set(artifact_names(uri, parents["unit-study"], "dashboards"))
    # This report's own page (its budget line), not one an earlier report left there.
    logged = client_for(uri).download_artifacts(parents["unit-study"], "dashboards/pareto.html", str(tmp_path / "dl"))
    assert "budget 840,000" in open(logged).read()


def test_a_combined_report_logs_under_its_own_name_on_every_parent(capsys, mlflow_store, tmp_path):
    uri, parents = mlflow_store
    code, out, _ = report(
        capsys, "unit-study", "unit-baselines", "--mlflow-uri", uri, "--out", str(tmp_path), "--no-png"
    )
    assert code == 0 and "10 trials" in out
    assert "study unit-baselines: MLflow experiment" in out
    for study in ("unit-study", "unit-baselines"):
        assert artifact_names(uri, parents[study], "dashboards/unit-study+unit-baselines") == [
            f"{v}.html" for v in VIEW_NAMES
        ]


def test_an_unknown_study_is_bad_input_listing_the_known_ones(capsys, mlflow_store):
    code, _, err = report(capsys, "missing", "--mlflow-uri", mlflow_store[0], "--no-png")
    assert code == 2 and re.search("no study 'missing'.*unit-study", err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "lots"], "--budget: budget 'lots'"),
        (["--reference", "0"], "--reference '0': expected CIDER,PARAMS"),
        (["--reference", "x,1M"], "CIDEr 'x' is not a number"),
    ],
)
def test_bad_budget_or_reference_is_a_config_error(capsys, mlflow_store, args, message):
    code, _, err = report(capsys, "unit-study", "--mlflow-uri", mlflow_store[0], "--no-png", *args)
    assert code == 2 and message in err


def test_an_unreachable_server_fails_fast_with_how_to_start_one(capsys):
    code, _, err = report(capsys, "unit-study", "--mlflow-uri", "http://127.0.0.1:9", "--no-png")
    assert code == 2 and re.search("unreachable.*mlflow server", err)


def test_a_percentage_budget_is_a_share_of_the_base_model_the_parent_run_logged(capsys, study_logging, tmp_path):
    """Not of the smallest trial's measured total: every trial here adds its adapter to the base."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = study_logging.start_study(uri, "adapters-family", "adapters", tmp_path)  # base: 120M
    for trial in (study_logging.Trial("a0", "lora", {"adapter.rank": 4}, 0.30, 650_000, epochs=(0.30,)),
                  study_logging.Trial("a1", "lora", {"adapter.rank": 8}, 0.35, 1_203_000, epochs=(0.35,))):
        study_logging.end_trial(study_logging.begin_trial(target, trial), trial)
    code, out, _ = report(capsys, "adapters", "--mlflow-uri", uri, "--budget", "1%", "--out", str(tmp_path), "--no-png")
    # 1% of the smallest total (120.65M) would be 1,206,500 and let a1 in.
    assert code == 0 and "best under budget 1% (1,200,000 params): lora r=4 (trial a0)" in out


def test_a_percentage_budget_needs_the_base_total_on_the_parent_run(capsys, mlflow_store):
    code, _, err = report(capsys, "empty", "--mlflow-uri", mlflow_store[0], "--budget", "1%", "--no-png")
    assert code == 2 and "--budget: the parent run of empty logged no total_params" in err
