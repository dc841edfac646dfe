"""The replay table: nearest recorded config per method, the committed table's shape and provenance, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from qstudy.study.replay import CurveTable
from qstudy.study.space import load_space
from shapes import tiny_dims

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "bench" / "data" / "tiny_curves.json"


def _table(rows: list[dict], epochs: int = 3) -> CurveTable:
    return CurveTable({"epochs": epochs, "configs": [{"train_loss": [1.0] * epochs, **row} for row in rows]})


ROWS = [
    {"method": "qadapter", "values": {"adapter.rank": 4, "adapter.gating": "tanh", "train.learning_rate": 0.001},
     "cider": [1.0, 1.1, 1.2]},
    {"method": "qadapter", "values": {"adapter.rank": 16, "adapter.gating": "tanh", "train.learning_rate": 0.004},
     "cider": [2.0, 2.1, 2.2]},
    {"method": "qadapter", "values": {"adapter.rank": 16, "adapter.gating": "none", "train.learning_rate": 0.001},
     "cider": [3.0, 3.1, 3.2]},
    {"method": "frozen", "values": {"train.learning_rate": 0.002}, "cider": [0.5, 0.6, 0.7]},
]


def test_nearest_counts_differing_categories_and_log_distance():
    table = _table(ROWS)
    # rank and gating as recorded in row 1; the learning rate halfway (in log) to row 0's
    assert table.nearest("qadapter", {"adapter.rank": 16, "adapter.gating": "tanh",
                                      "train.learning_rate": 0.002}).index == 1
    # one category off from rows 1 and 2 each: the learning rate decides (0.0011 is row 2's)
    assert table.nearest("qadapter", {"adapter.rank": 16, "adapter.gating": "sigmoid",
                                      "train.learning_rate": 0.0011}).index == 2
    # never another method's curve, whatever its values
    assert table.nearest("frozen", {"train.learning_rate": 0.001}).index == 3
    with pytest.raises(KeyError, match="no curve recorded for method 'lora'"):
        table.nearest("lora", {})


def test_zero_and_unset_values_are_categories_not_log_distances():
    """ADEM-VL's vision_adapter_dim 0 (no adapter) and prompt tuning's mid_dim null (no reparametrisation)."""
    rows = [{"method": "ademvl", "values": {"adapter.vision_adapter_dim": dim, "adapter.mid_dim": mid},
             "cider": [float(index)] * 3} for index, (dim, mid) in enumerate([(0, None), (8, 64), (8, None)])]
    table = _table(rows)
    assert table.nearest("ademvl", {"adapter.vision_adapter_dim": 0, "adapter.mid_dim": None}).index == 0
    assert table.nearest("ademvl", {"adapter.vision_adapter_dim": 8, "adapter.mid_dim": 64}).index == 1


def test_a_curve_shorter_than_the_table_is_refused():
    with pytest.raises(ValueError, match="config 0 has 2 epochs of 3"):
        _table([{**ROWS[0], "cider": [1.0, 1.1]}])


def test_the_committed_table_covers_every_method_of_its_space_at_two_seeds():
    data = json.loads(TABLE.read_text())
    assert data["provenance"] and all({"commit", "date", "command", "workspace"} <= set(session)
                                      for session in data["provenance"])
    table = CurveTable(data, str(TABLE))
    space = load_space(REPO / "search_spaces" / "every_method_tiny.yaml", dims=tiny_dims())
    assert table.epochs == space.base["train"]["epochs"]
    assert table.methods() == {arm.method for arm in space.arms}
    seeds: dict[str, set[int]] = {}
    for curve in table.curves:  # every recorded config is one its space can sample
        params = {param.key: param for param in space.arm(curve.method).params}
        assert set(curve.values) <= set(params)  # a conditional key is left out where unused
        for key, value in curve.values.items():
            param = params[key]
            assert value in param.choices if param.choices else param.low <= value <= param.high
        seeds.setdefault(json.dumps([curve.method, curve.values], sort_keys=True), set()).add(curve.seed)
    assert all(found == {0, 1} for found in seeds.values())
    assert sum(curve.method == "qadapter" for curve in table.curves) >= 16


def test_a_config_replays_the_curve_of_its_draw():
    table = _table([{**ROWS[3], "seed": 1, "cider": [0.9, 0.9, 0.9]}, {**ROWS[3], "seed": 0}])
    assert [table.nearest("frozen", {"train.learning_rate": 0.002}, draw).cider[-1] for draw in range(3)] == [
        0.7, 0.9, 0.7]


def test_replay_imports_no_torch():
    code = ("import sys, qstudy.study.replay, qstudy.study.scheduler, qstudy.study.search, qstudy.study.budget\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
