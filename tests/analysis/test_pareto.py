"""Pareto front, hypervolume, knee and budget helpers checked against hand-worked examples."""

import math
import random
import subprocess
import sys

import numpy as np
import pytest

from qstudy.analysis.pareto import (
    analyse,
    best_under_budget,
    default_reference,
    front_ranks,
    front_table,
    hypervolume,
    hypervolume_history,
    knee_point,
    pareto_front,
    parse_budget,
)
from qstudy.records import TrialRecord


def record(trial_id, cider, params, status="FINISHED", order=0, method="qadapter", total=10_000_000, **hyper):
    return TrialRecord(
        trial_id=str(trial_id),
        study="unit",
        method=method,
        params=hyper,
        cider=cider,
        trainable_params=params,
        total_params=total,
        status=status,
        order=order,
    )


def ids(records):
    return [r.trial_id for r in records]


def dominates(a, b):
    at_least_as_good = a.cider >= b.cider and a.trainable_params <= b.trainable_params
    strictly_better = a.cider > b.cider or a.trainable_params < b.trainable_params
    return at_least_as_good and strictly_better


# --- pareto_front -------------------------------------------------------------------------


def test_front_drops_dominated_and_sorts_by_params():
    records = [
        record("big", 0.60, 5_000),
        record("small", 0.30, 100),
        record("mid", 0.50, 1_000),
        record("worse-mid", 0.40, 2_000),  # mid has more CIDEr for fewer params
    ]
    assert ids(pareto_front(records)) == ["small", "mid", "big"]


def test_identical_points_are_both_on_the_front():
    records = [record("a", 0.5, 1_000), record("b", 0.5, 1_000), record("cheap", 0.2, 10)]
    assert ids(pareto_front(records)) == ["cheap", "a", "b"]


def test_equal_params_lower_cider_is_dominated():
    records = [record("better", 0.5, 1_000), record("worse", 0.4, 1_000)]
    assert ids(pareto_front(records)) == ["better"]


def test_equal_cider_more_params_is_dominated():
    records = [record("lean", 0.5, 1_000), record("fat", 0.5, 2_000)]
    assert ids(pareto_front(records)) == ["lean"]


def test_failed_and_metricless_trials_are_ignored():
    records = [
        record("ok", 0.3, 1_000),
        record("failed", 0.9, 10, status="FAILED"),  # would dominate everything if counted
        record("no-cider", None, 10),
        record("nan-cider", math.nan, 10),
        record("no-params", 0.9, None),
        record("infeasible", 0.9, 10, status="INFEASIBLE"),
    ]
    assert ids(pareto_front(records)) == ["ok"]


def test_single_trial_and_empty_input():
    assert ids(pareto_front([record("only", 0.1, 5)])) == ["only"]
    assert pareto_front([]) == []
    assert pareto_front([record("failed", None, None, status="FAILED")]) == []


def test_all_dominated_but_one():
    records = [record("winner", 0.9, 10)] + [record(i, 0.9 - 0.1 * i, 10 + i) for i in range(1, 6)]
    assert ids(pareto_front(records)) == ["winner"]


@pytest.mark.parametrize("seed", range(200))
def test_front_matches_brute_force_dominance(seed):
    rng = random.Random(seed)
    # Coarse grids make ties and duplicates common, where dominance is easiest to get wrong.
    records = [
        record(
            i,
            rng.choice([None, *(round(0.1 * k, 1) for k in range(6))]),
            rng.choice([None, 10, 100, 1_000, 10_000]),
            status=rng.choice(["FINISHED"] * 5 + ["FAILED"]),
        )
        for i in range(rng.randint(1, 25))
    ]
    valid = [r for r in records if r.is_valid]
    front = pareto_front(records)
    front_ids = set(ids(front))

    assert all(r.is_valid for r in front)
    assert [r.trainable_params for r in front] == sorted(r.trainable_params for r in front)
    for member in front:
        assert not any(dominates(other, member) for other in valid)
    for non_member in (r for r in valid if r.trial_id not in front_ids):
        assert any(dominates(member, non_member) for member in front)


# --- hypervolume --------------------------------------------------------------------------


def test_hypervolume_of_two_points_is_the_union_of_two_rectangles():
    # Reference (CIDEr 0, 500 params). A=(0.5 CIDEr, 100 params) dominates params 100..500 x
    # CIDEr 0..0.5 = 400 * 0.5 = 200; B=(0.8, 300) dominates 200 * 0.8 = 160; they overlap on
    # params 300..500 x CIDEr 0..0.5 = 200 * 0.5 = 100. Union = 200 + 160 - 100 = 260.
    records = [record("A", 0.5, 100), record("B", 0.8, 300)]
    assert hypervolume(records, (0.0, 500)) == pytest.approx(260.0)


def test_points_worse_than_the_reference_add_nothing():
    # Reference (CIDEr 0.4, 500 params). A: 400 * (0.5 - 0.4) = 40; B: 200 * 0.4 = 80; overlap
    # 200 * 0.1 = 20, so 100. C is below the CIDEr floor and D above the parameter ceiling.
    records = [
        record("A", 0.5, 100),
        record("B", 0.8, 300),
        record("C", 0.3, 50),
        record("D", 0.9, 600),
        record("failed", 1.0, 1, status="FAILED"),
    ]
    assert hypervolume(records, (0.4, 500)) == pytest.approx(100.0)


def test_hypervolume_of_nothing_is_zero():
    assert hypervolume([], (0.0, 100.0)) == 0.0
    assert hypervolume([record("failed", None, None, status="FAILED")], (0.0, 100.0)) == 0.0


def test_dominated_points_do_not_change_the_hypervolume():
    front = [record("A", 0.5, 100), record("B", 0.8, 300)]
    with_dominated = [*front, record("C", 0.4, 200), record("D", 0.5, 100)]
    assert hypervolume(with_dominated, (0.0, 500)) == pytest.approx(hypervolume(front, (0.0, 500)))


def test_default_reference_is_zero_cider_and_ten_percent_over_the_largest_trial():
    records = [record("A", 0.5, 100), record("B", 0.8, 300), record("failed", None, 9_999, status="FAILED")]
    assert default_reference(records) == pytest.approx((0.0, 330.0))
    assert default_reference([]) == (0.0, 0.0)


def trials_out_of_completion_order() -> list:
    """A and B on the front (listed B first), a failed trial, then the dominated C."""
    return [
        record("B", 0.8, 300, order=1),
        record("A", 0.5, 100, order=0),
        record("failed", None, None, status="FAILED", order=2),
        record("C", 0.4, 200, order=3),
    ]


def test_hypervolume_history_by_hand():
    # Reference (0, 500): A alone 200; B adds 160 - 100 overlap -> 260; the failed trial and
    # the dominated C leave it at 260.
    records = trials_out_of_completion_order()
    history = hypervolume_history(records, (0.0, 500))
    assert [order for order, _ in history] == [0, 1, 2, 3]
    assert [volume for _, volume in history] == pytest.approx([200.0, 260.0, 260.0, 260.0])


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_history_never_decreases(seed):
    rng = random.Random(seed)
    records = [
        record(i, rng.random(), rng.randint(1, 10**6), status=rng.choice(["FINISHED", "FINISHED", "FAILED"]), order=i)
        for i in range(40)
    ]
    rng.shuffle(records)
    history = hypervolume_history(records, default_reference(records))
    assert [order for order, _ in history] == list(range(40))
    volumes = [volume for _, volume in history]
    assert all(later >= earlier for earlier, later in zip(volumes, volumes[1:]))
    assert volumes[-1] == pytest.approx(hypervolume(records, default_reference(records)))


# --- knee_point ---------------------------------------------------------------------------


def test_knee_on_a_convex_front():
    # log10 params 3, 4, 5, 6 scale to 0, 1/3, 2/3, 1; CIDEr 0.10, 0.40, 0.45, 0.50 to 0, 0.75,
    # 0.875, 1. Height above the chord (scaled CIDEr - scaled params): 0, 0.417, 0.208, 0.
    front = pareto_front(
        [
            record("1k", 0.10, 1_000),
            record("10k", 0.40, 10_000),
            record("100k", 0.45, 100_000),
            record("1M", 0.50, 10**6),
        ]
    )
    assert knee_point(front).trial_id == "10k"


def test_knee_of_small_fronts():
    assert knee_point([]) is None
    only = record("only", 0.4, 10)
    assert knee_point([only]) == only
    # Both points sit on the chord; the tie goes to the cheaper one.
    assert knee_point(pareto_front([record("cheap", 0.1, 10), record("dear", 0.5, 1_000)])).trial_id == "cheap"


# --- budgets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5%", 150_000),
        ("100%", 10_000_000),
        ("250000", 250_000),
        ("250k", 250_000),
        ("1.2M", 1_200_000),
        (" 2.5 m ", 2_500_000),
        ("1B", 10**9),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, total_params=10_000_000) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.5%%", "-5k", "12 apples", "1e5", "0", "0%", "150%", "k"])
def test_parse_budget_rejects_garbage_naming_the_input(text):
    with pytest.raises(ValueError, match=f"budget {text!r}"):
        parse_budget(text, total_params=10_000_000)


def test_best_under_budget():
    records = [
        record("cheap", 0.30, 100),
        record("fits", 0.50, 1_000),
        record("fits-leaner", 0.50, 800),  # same CIDEr, fewer params: preferred
        record("too-big", 0.90, 5_000),
        record("failed", 0.99, 10, status="FAILED"),
    ]
    assert best_under_budget(records, 1_000).trial_id == "fits-leaner"
    assert best_under_budget(records, 5_000).trial_id == "too-big"
    assert best_under_budget(records, 100).trial_id == "cheap"
    assert best_under_budget(records, 99) is None
    assert best_under_budget(records, None).trial_id == "too-big"  # no budget: the best CIDEr


def test_analyse_computes_everything_once_in_completion_order():
    records = trials_out_of_completion_order()
    analysis = analyse(records, reference=(0.0, 500), budget=250)
    assert ids(analysis.records) == ["A", "B", "failed", "C"]
    assert ids(analysis.front) == ["A", "B"] and ids(analysis.valid) == ["A", "B", "C"]
    assert analysis.hypervolume == pytest.approx(260.0)
    assert [volume for _, volume in analysis.history] == pytest.approx([200.0, 260.0, 260.0, 260.0])
    assert analysis.knee.trial_id == "A" and analysis.best.trial_id == "B"
    assert analysis.best_under_budget.trial_id == "A"
    assert analysis.ideal_box == pytest.approx(0.8 * 500)
    assert analyse(records).reference == pytest.approx((0.0, 330.0))
    empty = analyse([])
    assert (empty.front, empty.knee, empty.best, empty.hypervolume, empty.ideal_box) == ((), None, None, 0.0, 0.0)


# --- labels and table ---------------------------------------------------------------------


def test_label_is_method_plus_compact_params():
    trial = record(
        "t", 0.4, 10, num_query_tokens=8, insertion_layers="last:2", gating="tanh", rank=16, queries_to_lm=False
    )
    assert trial.label == "qadapter K=8 L=last:2 tanh r=16"
    lora = record("l", 0.4, 10, method="lora", rank=8, alpha=16.0, target="both", learning_rate=3e-4)
    assert lora.label == "lora r=8 alpha=16 both lr=0.0003"
    assert record("f", 0.2, 10, method="frozen").label == "frozen"


def test_front_table_marks_the_knee_and_aligns_columns():
    front = pareto_front(
        [record("1k", 0.10, 1_000), record("10k", 0.40, 10_000, rank=4), record("1M", 0.50, 10**6, method="lora")]
    )
    table = front_table(front, knee_point(front))
    lines = table.splitlines()
    assert len(lines) == 2 + len(front)
    assert lines[0].split() == ["trial", "method", "config", "CIDEr", "trainable", "%", "of", "total", "knee"]
    assert [line.split()[0] for line in lines[2:]] == ["1k", "10k", "1M"]
    knee_rows = [line for line in lines if line.endswith("*")]
    assert knee_rows == [lines[3]] and "10,000" in knee_rows[0] and "r=4" in knee_rows[0]
    # Right-aligned numbers: the CIDEr column ends at the same position on every row.
    cider_end = lines[0].index("CIDEr") + len("CIDEr")
    assert all(line[cider_end - 6 : cider_end] in ("0.1000", "0.4000", "0.5000", " CIDEr", "------") for line in lines)
    assert "10%" in lines[4] and "0.01%" in lines[2]


def test_front_table_of_an_empty_front_says_so():
    assert "no finished trial" in front_table([])


def test_analysis_imports_neither_torch_nor_transformers():
    # A fresh interpreter: other test modules in this session may have imported torch already.
    code = (
        "import sys, qstudy.analysis.report, qstudy.analysis.dashboards, qstudy.export;"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def _brute_force_fronts(losses: np.ndarray) -> list[int]:
    remaining, ranks, front = set(range(len(losses))), [0] * len(losses), 0
    while remaining:
        current = {i for i in remaining if not any(
            np.all(losses[j] <= losses[i]) and np.any(losses[j] < losses[i]) for j in remaining)}
        for i in current:
            ranks[i] = front
        remaining -= current
        front += 1
    return ranks


@pytest.mark.parametrize("seed", range(5))
def test_front_ranks_are_the_non_dominated_fronts(seed):
    """front_ranks wraps Optuna's private routine: pin its meaning, ties and duplicates included."""
    rng = random.Random(seed)
    losses = np.array([[rng.choice([0.5, 1.0, 1.5, 2.0]), rng.choice([10, 20, 30])] for _ in range(25)], dtype=float)
    assert front_ranks(losses).tolist() == _brute_force_fronts(losses)
