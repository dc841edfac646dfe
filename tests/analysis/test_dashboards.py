"""The dashboards drawn from the views in dashboards/: figure contents, view options, offline HTML."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from qstudy.analysis.dashboards import render, write_dashboards
from qstudy.analysis.pareto import analyse
from qstudy.analysis.views import (
    EpochCurvesOptions,
    HypervolumeOptions,
    ParallelCoordinatesOptions,
    ParetoOptions,
    load_views,
)
from qstudy.records import TrialRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
VIEWS = {view.name: view for view in load_views(REPO_ROOT / "dashboards")}


def qadapter(order, cider, params, tokens, layers, gating, rank, epochs=()):
    hyper = {
        "adapter.num_query_tokens": tokens,
        "adapter.insertion_layers": layers,
        "adapter.gating": gating,
        "adapter.rank": rank,
        "train.learning_rate": 1e-3,
    }
    return TrialRecord(
        f"t{order}", "demo", "qadapter", hyper, cider, params, 120_000_000, "FINISHED", epochs, order=order
    )


def lora(order, cider, params, rank, alpha, target, epochs=(), status="FINISHED"):
    hyper = {"adapter.rank": rank, "adapter.alpha": alpha, "adapter.target": target, "train.learning_rate": 3e-4}
    return TrialRecord(f"t{order}", "demo", "lora", hyper, cider, params, 120_000_000, status, epochs, order=order)


RECORDS = [
    TrialRecord("t0", "demo", "frozen", {}, 0.21, 600_000, 120_000_000, "FINISHED", (0.15, 0.19, 0.21), order=0),
    qadapter(1, 0.34, 650_000, 8, "last:2", "tanh", 16, (0.25, 0.31, 0.34)),
    qadapter(2, 0.38, 900_000, 16, "last:4", "sigmoid", 32, (0.27, 0.35, 0.38)),
    qadapter(3, 0.30, 1_200_000, 8, "all", "none", 8, (0.2, 0.3)),  # dominated
    lora(4, 0.33, 2_000_000, 8, 16.0, "vision"),  # dominated
    lora(5, 0.41, 8_000_000, 32, 64.0, "both", (0.30, 0.38, 0.41)),
    lora(6, None, None, 64, 16.0, "lm", status="FAILED"),
    TrialRecord(
        "t7",
        "demo",
        "full",
        {"train.learning_rate": 1e-5},
        0.43,
        120_000_000,
        120_000_000,
        "FINISHED",
        (0.33, 0.40, 0.43),
        order=7,
    ),
]
ANALYSIS = analyse(RECORDS, budget=1_000_000)  # front t0, t1, t2, t5, t7; knee and best under budget: t2


def test_the_repository_defines_the_four_views():
    assert {name: view.view for name, view in VIEWS.items()} == {
        "pareto": "pareto",
        "hypervolume": "hypervolume",
        "parallel_coordinates": "parallel_coordinates",
        "epoch_curves": "epoch_curves",
    }
    assert all(view.title and view.description for view in VIEWS.values())


def test_pareto_view_draws_methods_front_knee_and_budget():
    figure = render(VIEWS["pareto"], ANALYSIS)
    names = [trace.name for trace in figure.data]
    assert ANALYSIS.knee.trial_id == "t2" and ANALYSIS.best_under_budget.trial_id == "t2"
    assert names == [
        "frozen",
        "full",
        "lora",
        "qadapter",
        "Pareto front",
        "knee (trial t2)",
        "budget 1,000,000",
        "best under budget (trial t2)",
    ]
    assert [label for _, label in figure.data[5].customdata] == ["qadapter K=16 L=last:4 sigmoid r=32 lr=0.001"]
    lora_trace = figure.data[2]
    assert list(lora_trace.x) == [2_000_000, 8_000_000]  # the failed LoRA trial has no point
    # every point hovers its label; only the front's print their config beside them
    assert [label for _, label in lora_trace.customdata] == [
        "lora r=8 alpha=16 vision lr=0.0003",
        "lora r=32 alpha=64 both lr=0.0003",
    ]
    assert list(lora_trace.text) == ["", "r=32 alpha=64 both lr=0.0003"]
    assert list(figure.data[0].text) == ["frozen"]  # no config: the method itself
    front_line = figure.data[4]
    assert front_line.line.shape == "hv" and list(front_line.x) == [r.trainable_params for r in ANALYSIS.front]
    assert list(figure.data[6].x) == [1_000_000, 1_000_000]
    assert figure.layout.xaxis.type == "log"
    assert figure.layout.title.text == "Val CIDEr vs trainable parameters: 7 trials, 5 on the Pareto front"
    # the description, broken into lines that fit the PNG's width
    assert figure.layout.title.subtitle.text.replace("<br>", " ") == VIEWS["pareto"].description
    assert all(len(line) <= 1100 // 8 for line in figure.layout.title.subtitle.text.split("<br>"))


def test_a_stopped_trial_is_counted_but_never_drawn():
    # A trial stopped at a rung: better than every other trial at its low fidelity, but no final CIDEr.
    stopped = qadapter(8, None, 100_000, 2, "last:1", "none", 4, (0.9,))
    stopped = replace(stopped, status="STOPPED")
    analysis = analyse([*RECORDS, stopped], budget=1_000_000)
    assert [record.trial_id for record in analysis.front] == [record.trial_id for record in ANALYSIS.front]
    figure = render(VIEWS["pareto"], analysis)
    assert 100_000 not in [x for trace in figure.data for x in (trace.x or ())]
    assert figure.layout.title.text == ("Val CIDEr vs trainable parameters: 7 trials, 5 on the Pareto front; "
                                        "1 stopped early by the scheduler, not shown")
    every = render(replace(VIEWS["epoch_curves"], options=EpochCurvesOptions(trials="all")), analysis)
    assert len(every.data) == 6


def test_pareto_options_switch_off_marks_and_change_the_axis():
    options = ParetoOptions(params_axis="linear", point_labels="none", mark_knee=False, mark_budget=False)
    figure = render(replace(VIEWS["pareto"], options=options), ANALYSIS)
    assert [trace.name for trace in figure.data] == ["frozen", "full", "lora", "qadapter", "Pareto front"]
    assert all(trace.mode == "markers" and trace.text is None for trace in figure.data[:4])
    every = render(replace(VIEWS["pareto"], options=ParetoOptions(point_labels="all")), ANALYSIS)
    assert list(every.data[2].text) == ["r=8 alpha=16 vision lr=0.0003", "r=32 alpha=64 both lr=0.0003"]
    assert figure.layout.xaxis.type == "linear"
    # Without a budget there is nothing to mark, whatever the option says.
    assert len(render(VIEWS["pareto"], analyse(RECORDS)).data) == 6


def test_hypervolume_view_raw_and_normalized():
    raw = render(replace(VIEWS["hypervolume"], options=HypervolumeOptions(normalized=False)), ANALYSIS)
    assert list(raw.data[0].x) == list(range(len(RECORDS)))  # failed trial included
    assert raw.data[0].y[-1] == pytest.approx(ANALYSIS.hypervolume)
    normalized = render(replace(VIEWS["hypervolume"], options=HypervolumeOptions(normalized=True)), ANALYSIS)
    # reference (0, 1.32e8) and ideal point (0.43, 0): the box is 0.43 * 1.32e8
    assert normalized.data[0].y[-1] == pytest.approx(ANALYSIS.hypervolume / (0.43 * 1.32e8))
    assert 0 < normalized.data[0].y[0] <= normalized.data[0].y[-1] <= 1
    assert "reference CIDEr 0, 132,000,000 params" in normalized.layout.title.text


def test_parallel_coordinates_encode_categoricals_with_tick_labels():
    figure = render(VIEWS["parallel_coordinates"], ANALYSIS)
    dimensions = figure.data[0].dimensions
    by_label = {dimension.label: dimension for dimension in dimensions}
    assert [d.label for d in dimensions] == [
        "method",
        "num_query_tokens",
        "insertion_layers",
        "gating",
        "rank",
        "learning_rate",
        "alpha",
        "target",
        "log10 trainable params",
        "val CIDEr",
    ]
    gating = by_label["gating"]
    assert list(gating.ticktext) == ["none", "sigmoid", "tanh", "n/a"]  # LoRA, frozen, full have no gate
    assert [gating.ticktext[code] for code in gating.values] == ["n/a", "tanh", "sigmoid", "none", "n/a", "n/a", "n/a"]
    assert list(by_label["rank"].ticktext) == ["8", "16", "32", "n/a"]  # numeric order, not "16" < "8"
    assert by_label["val CIDEr"].ticktext is None  # fully numeric axes stay numeric
    assert list(figure.data[0].line.color) == [r.cider for r in ANALYSIS.valid]
    by_size = render(
        replace(VIEWS["parallel_coordinates"], options=ParallelCoordinatesOptions("trainable_params")), ANALYSIS
    )
    assert list(by_size.data[0].line.color) == list(by_label["log10 trainable params"].values)


def test_epoch_curves_of_the_front_or_of_every_trial():
    front = render(VIEWS["epoch_curves"], ANALYSIS)
    assert [trace.name for trace in front.data] == [r.label for r in ANALYSIS.front]
    assert list(front.data[0].x) == [1, 2, 3] and list(front.data[0].y) == [0.15, 0.19, 0.21]
    every = render(replace(VIEWS["epoch_curves"], options=EpochCurvesOptions(trials="all")), ANALYSIS)
    assert len(every.data) == 6  # the valid trials that logged epochs (t4 logged none)


def test_html_is_standalone_and_works_offline(tmp_path):
    paths = write_dashboards(ANALYSIS, list(VIEWS.values()), tmp_path, png=False)
    assert sorted(path.name for path in paths) == sorted(f"{name}.html" for name in VIEWS)
    for path in paths:
        html = path.read_text()
        assert "plotly.js v" in html  # the library is inlined ...
        assert not re.search(r"<script[^>]*\bsrc=", html)  # ... and nothing is fetched


def test_an_empty_study_still_draws_every_view(tmp_path):
    failed_only = analyse([lora(0, None, None, 8, 16.0, "lm", status="FAILED")])
    assert len(write_dashboards(failed_only, list(VIEWS.values()), tmp_path, png=False)) == len(VIEWS)
