"""`qstudy evaluate` after a real study: the front's adapters scored on the test split on the cluster, logged beside
their val metrics on the tracking server, shown by `qstudy report`, and read by nothing that selects or ranks trials.

One study on the session's cluster and MLflow server (two trials, cut to seconds), then the
command lines a user types, each a process of its own as the user runs them. (A local Ray
instance is the one every local study test starts: `qstudy evaluate` joins Ray as they do.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from servers import BIN, tiny_space

from qstudy.analysis.paper import LATEX_FILE, MARKDOWN_FILE
from qstudy.core.errors import EXIT_BAD_INPUT
from qstudy.tracking import schema

pytestmark = pytest.mark.timeout(900)
STUDY = "held-out"
TEST_CLIPS = 72  # the tiny workspace's test split


def qstudy(home: Path, env: dict, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """A `qstudy` command line as a user runs it."""
    return subprocess.run([str(BIN / "qstudy"), *args], env={**env, "QSTUDY_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout_s)


def test_the_held_out_config_reads_the_split_and_beams_asked_for_and_never_a_training_or_val_split():
    from dataclasses import replace

    from qstudy.cli import DEMO_CONFIG
    from qstudy.config import RunConfig
    from qstudy.core.errors import ConfigError
    from qstudy.study.evaluation import held_out_config

    config = RunConfig.from_yaml(DEMO_CONFIG)
    assert held_out_config(config, None, None) == config  # the trial's own data.test_split and eval.num_beams
    chosen = held_out_config(config, "heldout", 4)
    assert chosen == replace(config, data=replace(config.data, test_split="heldout"),
                             eval=replace(config.eval, num_beams=4))
    for split, field in (("validate", "data.val_split"), ("train", "data.train_split"), ("../x", "data.test_split")):
        with pytest.raises(ConfigError, match=field):
            held_out_config(config, split, None)


def selection_view(home: Path, uri: str) -> tuple:
    """What ranks and selects the study's trials: its analysis, every --select's choice, and Optuna's trials."""
    import optuna

    from qstudy.analysis.report import read_studies
    from qstudy.analysis.selection import Selection, select_trials

    selection = read_studies([STUDY], uri)
    analysis = selection.analysis
    chosen = {text: [(record.trial_id, reason) for record, reason in select_trials(selection, Selection.parse(text))]
              for text in ("front", "knee", "best")}
    state = json.loads((home / "studies" / STUDY / "study.json").read_text())
    sampler = [(trial.number, trial.state, trial.values, trial.params)
               for trial in optuna.load_study(study_name=STUDY, storage=state["optuna_storage"]).trials]
    return analysis.records, analysis.front, analysis.knee, analysis.best, analysis.hypervolume, chosen, sampler


def trial_runs(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    from qstudy.analysis.report import read_studies

    client = MlflowClient(uri)
    return {record.trial_id: client.get_run(record.run_id).data
            for record in read_studies([STUDY], uri).analysis.records}


def test_evaluate_scores_the_front_on_test_logs_it_beside_val_and_the_report_prints_the_paper_table(
        ray_head, mlflow_server, study_home, tmp_path):
    space = tiny_space(tmp_path, trials=2, concurrency=2, sampler="random", seed=1)
    env, cluster, uri = ray_head.env, ("--address", ray_head.address), ("--mlflow-uri", mlflow_server.uri)
    study = qstudy(study_home, env, "study", str(space), "--name", STUDY, *cluster, *uri)
    assert study.returncode == 0, (study.stdout + study.stderr)[-5000:]
    before = selection_view(study_home, mlflow_server.uri)
    front = {record.trial_id for record in before[1]}
    cache = study_home / "cache"
    entries = {path.name for path in cache.iterdir() if path.is_dir()}

    # A split the data does not have, or the split trials were selected on: one line, exit 2, nothing evaluated.
    for split, field in (("no-such-split", "data.test_split"), ("validate", "data.val_split")):
        refused = qstudy(study_home, env, "evaluate", STUDY, "--split", split, *cluster, *uri)
        assert refused.returncode == EXIT_BAD_INPUT, refused.stderr[-3000:]
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("qstudy: config error: trial ") and field in line and repr(split) in line, line
    assert not any(key.startswith(schema.TEST_PREFIX)
                   for run in trial_runs(mlflow_server.uri).values() for key in run.metrics)
    assert {path.name for path in cache.iterdir() if path.is_dir()} == entries  # no video decoded

    evaluated = qstudy(study_home, env, "evaluate", STUDY, "--select", "front", "--split", "test", "--beams", "2",
                       *cluster, *uri)
    print(evaluated.stdout, evaluated.stderr)  # shown when an assertion below fails
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-5000:]
    assert f"{len(front)} trials scored" in evaluated.stdout and f"qstudy report {STUDY}" in evaluated.stdout

    # Each front trial's own run holds its test scores beside its val scores; the others hold none.
    for trial_id, run in trial_runs(mlflow_server.uri).items():
        test = {key: value for key, value in run.metrics.items() if key.startswith(schema.TEST_PREFIX)}
        if trial_id not in front:
            assert not test, trial_id
            continue
        assert set(schema.TEST_METRICS) <= set(test), test
        assert test[schema.TEST_CLIPS] == TEST_CLIPS and test[schema.TEST_SKIPPED_VIDEOS] == 0
        assert 0 < test[f"{schema.TEST_PREFIX}cider"] < 10 and 0 < test[f"{schema.TEST_PREFIX}meteor"] <= 1
        assert schema.VAL_CIDER in run.metrics
        assert run.tags[schema.TEST_SPLIT_TAG] == "test" and run.tags[schema.TEST_BEAMS_TAG] == "2"
    # The test split went through the node's frame cache, as the trials' splits did.
    assert len({path.name for path in cache.iterdir() if path.is_dir()} - entries) == 1

    # Selection stays on validation: the analysis, every --select and Optuna's trials are as before.
    assert selection_view(study_home, mlflow_server.uri) == before

    report = qstudy(study_home, env, "report", STUDY, "--no-png", "--out", str(tmp_path / "report"), *uri)
    print(report.stdout)
    assert report.returncode == 0, report.stderr[-3000:]
    markdown = (tmp_path / "report" / MARKDOWN_FILE).read_text()
    assert "paper table" in report.stdout and markdown.splitlines()[0] in report.stdout
    rows = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    assert len(rows) == len(front)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # val BLEU@4, ROUGE-L and CIDEr measured (METEOR is off in the tiny space), and all four on test.
        assert cells[3] != "-" and cells[4] == "-" and "-" not in cells[5:], row
    assert "Test: split 'test', 2 beam(s)." in markdown
    latex = (tmp_path / "report" / LATEX_FILE).read_text()
    assert r"\multicolumn{4}{c}{Validation} & \multicolumn{4}{c}{Test}" in latex
    assert latex.count("qadapter") == len(front)

    # Export reads the trial's artifacts through the tracking server, which keeps them in S3: no S3 credentials here.
    exported = qstudy(study_home, env, "export", STUDY, "--select", "best", "--out", str(tmp_path / "export"), *uri)
    assert exported.returncode == 0, (exported.stdout + exported.stderr)[-5000:]
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert {path.name for path in (tmp_path / "export").rglob("*") if path.is_file()} >= {
        schema.CONFIG_ARTIFACT, schema.WEIGHTS_ARTIFACT}
