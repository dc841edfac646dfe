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


def test_a_curve_shorter_than_the_table_is_refused():
    with pytest.raises(ValueError, match="config 0 has 2 epochs of 3"):
        _table([{**ROWS[0], "cider": [1.0, 1.1]}])


def test_the_committed_table_covers_the_spaces_it_was_sampled_from():
    data = json.loads(TABLE.read_text())
    assert data["provenance"] and all({"commit", "date", "command", "workspace"} <= set(session)
                                      for session in data["provenance"])
    table = CurveTable(data, str(TABLE))
    assert table.epochs >= 9
    methods = [curve.method for curve in table.curves]
    assert methods.count("qadapter") >= 40 and {"full", "frozen", "lora"} <= set(methods)
    spaces = {name: load_space(REPO / "search_spaces" / f"{name}.yaml", dims=tiny_dims())
              for name in ("qadapter_tiny", "baselines")}
    for curve in table.curves:  # every recorded config is one its space can sample
        space = spaces["qadapter_tiny" if curve.method == "qadapter" else "baselines"]
        params = {param.key: param for param in space.arm(curve.method).params}
        assert set(curve.values) == set(params)
        for key, value in curve.values.items():
            param = params[key]
            assert value in param.choices if param.choices else param.low <= value <= param.high


def test_replay_imports_no_torch():
    code = "import sys, qstudy.study.replay, qstudy.study.scheduler, qstudy.study.search\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
