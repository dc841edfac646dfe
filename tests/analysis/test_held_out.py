"""Held-out (test) scores in MLflow: ``qstudy report``'s paper table shows them, and nothing that selects or ranks
trials reads them.

A real MLflow sqlite store with a study logged the way the study engine logs it; the test
scores are logged with the writer ``qstudy evaluate`` uses, in the opposite order of the val
scores, so any reader that used them would rank, select and summarise differently.
"""

from __future__ import annotations

import pytest

from qstudy.analysis.paper import LATEX_FILE, MARKDOWN_FILE
from qstudy.analysis.report import read_studies
from qstudy.analysis.selection import Selection, select_trials
from qstudy.cli import main
from qstudy.tracking import schema, writer

# (trial, val CIDEr, trainable): t0 < t1 < t2 on both objectives' trade-off, all on the front; t3 is dominated.
TRIALS = [("t0", 0.20, 10_000), ("t1", 0.30, 20_000), ("t2", 0.40, 40_000), ("t3", 0.25, 80_000)]
SELECTIONS = ["front", "knee", "best", "budget=25000"]


@pytest.fixture
def study(study_logging, tmp_path):
    """``(uri, study name, {trial id: run id})``: four finished trials with val BLEU@4/ROUGE-L/CIDEr (no METEOR)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    target = study_logging.start_study(uri, "held-out-family", "held-out", tmp_path)
    for trial_id, cider, trainable in TRIALS:
        trial = study_logging.Trial(trial_id, "lora", {"adapter.rank": trainable // 1000}, cider, trainable,
                                    epochs=(cider / 2, cider))
        tracker = study_logging.begin_trial(target, trial)
        tracker.log_metrics({schema.VAL_PREFIX + "bleu4": cider / 2, schema.VAL_PREFIX + "rouge_l": 0.5}, step=1)
        study_logging.end_trial(tracker, trial)
    records = read_studies(["held-out"], uri).analysis.records
    return uri, "held-out", {record.trial_id: record.run_id for record in records}


def _view(uri: str, name: str):
    """What ranks and selects trials: the analysis, the choice of every --select, the study's summary records."""
    selection = read_studies([name], uri)
    analysis = selection.analysis
    chosen = {text: [(record.trial_id, reason) for record, reason in select_trials(selection, Selection.parse(text))]
              for text in SELECTIONS}
    return analysis.records, analysis.front, analysis.knee, analysis.best, analysis.hypervolume, chosen


def _log_inverted_test_scores(uri: str, runs: dict[str, str]) -> None:
    """Test scores in the opposite order of val CIDEr: the worst val trial scores best on test."""
    for rank, (trial_id, _, _) in enumerate(sorted(TRIALS, key=lambda trial: -trial[1])):
        scores = {name: 0.1 * (rank + 1) for name in schema.CAPTION_METRICS}
        writer.log_held_out(uri, runs[trial_id], {schema.TEST_PREFIX + name: value for name, value in scores.items()},
                            {schema.TEST_SPLIT_TAG: "test", schema.TEST_BEAMS_TAG: 3})


def test_test_scores_change_no_ranking_selection_or_summary(study):
    uri, name, runs = study
    before = _view(uri, name)
    assert [record.trial_id for record in before[1]] == ["t0", "t1", "t2"] and before[3].trial_id == "t2"

    _log_inverted_test_scores(uri, runs)

    assert read_studies([name], uri).held_out  # the scores are there for the paper table...
    assert _view(uri, name) == before  # ...and change nothing that ranks or selects


def test_the_report_prints_and_writes_the_paper_table_with_val_and_test_side_by_side(study, tmp_path, capsys):
    uri, name, runs = study
    assert main(["report", name, "--mlflow-uri", uri, "--no-png", "--out", str(tmp_path / "plain")]) == 0
    assert "paper table" not in capsys.readouterr().out  # nothing scored on held-out data yet
    assert not (tmp_path / "plain" / MARKDOWN_FILE).exists()

    _log_inverted_test_scores(uri, runs)
    assert main(["report", name, "--mlflow-uri", uri, "--no-png", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    markdown = (tmp_path / "report" / MARKDOWN_FILE).read_text()
    assert markdown.strip() in out
    header, rule, *rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "Method", "Params", "% of base", "val B@4", "val M", "val R", "val C", "test B@4", "test M", "test R", "test C"]
    # Cheapest first; scores x100; the share of the parent run's base total (120M); METEOR not measured on val.
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert [row[1] for row in cells] == ["10.0K", "20.0K", "40.0K", "80.0K"]
    assert cells[0] == ["lora r=10", "10.0K", "0.01%", "10.0", "-", "50.0", "20.0", "40.0", "40.0", "40.0", "40.0"]
    assert cells[2][3:] == ["20.0", "-", "50.0", "40.0", "10.0", "10.0", "10.0", "10.0"]
    assert "Test: split 'test', 3 beam(s)." in markdown

    latex = (tmp_path / "report" / LATEX_FILE).read_text()
    assert r"\multicolumn{4}{c}{Validation} & \multicolumn{4}{c}{Test} \\" in latex
    row = r"lora r=10 & 10.0K & 0.01\% & 10.0 & - & 50.0 & 20.0 & 40.0 & 40.0 & 40.0 & 40.0 \\"
    assert row in latex.splitlines(), latex
    assert latex.count(r"\\") == 4 + 2  # four rows and two header rows
