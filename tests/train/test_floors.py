"""Q-Adapter must clear both floors on the synthetic target domain: blind (caption prior) and frozen (projector only).

The thread count changes the arithmetic, and a verdict that flips with it is not a result:
bench/cider_ordering.py trains the floors under 1 and 2 threads on two base builds, and the
margins below are half the smallest gap over that grid. The suite trains the 1-thread cell; a
2-thread OpenMP team beside the suite's other worker runs several times slower, and the suite
has 20 minutes.
"""

from __future__ import annotations

import pytest

from qstudy.cli import DEMO_CONFIG
from qstudy.config import RunConfig
from qstudy.train.engine import cpu_threads
from qstudy.train.floors import floor_config
from qstudy.train.recipe import run

# Absolute CIDEr margins: half the smallest gap bench/cider_ordering.py measured over its whole
# grid (2 base builds x 1 and 2 threads x 3 seeds; see docs/benchmarks.md), so the test checks an
# ordering that held in every cell, on any machine's build of the base, not a lucky score.
MARGIN_FROZEN_OVER_BLIND = 0.5  # smallest gap 1.00
MARGIN_QADAPTER_OVER_BLIND = 0.35  # smallest gap 0.69


@pytest.fixture(scope="module")
def scores(tiny_workspace, tmp_path_factory) -> dict[str, float]:
    """Val CIDEr of the tiny preset's Q-Adapter run and of its two floors, seed 0, on one thread."""
    config = RunConfig.from_yaml(DEMO_CONFIG)
    config.eval.meteor = False  # CIDEr decides; METEOR's JVM would only add time
    arms = {"qadapter": config, "blind": floor_config(config, "blind"), "frozen": floor_config(config, "frozen")}
    results = {}
    with cpu_threads(1):
        for name, arm in arms.items():
            arm.output_dir = str(tmp_path_factory.mktemp(name))
            results[name] = run(arm, progress=False).final["cider"]
    return results


def test_frozen_base_clearly_beats_the_blind_floor(scores):
    """The pretrained encoder and projector already see the clips' colour: the video is used at all."""
    assert scores["frozen"] > scores["blind"] + MARGIN_FROZEN_OVER_BLIND, scores


def test_qadapter_clearly_beats_the_blind_floor(scores):
    assert scores["qadapter"] > scores["blind"] + MARGIN_QADAPTER_OVER_BLIND, scores


@pytest.mark.xfail(strict=False, reason=(
    "base-dependent: Q-Adapter beat the frozen floor by 1.3-1.7 CIDEr in all 6 cells on the base built "
    "with seed 0, but lost in 5 of 6 on the base of seed 1 (docs/benchmarks.md, floors grid); another machine's "
    "numerics build another base"))
def test_qadapter_beats_the_frozen_floor(scores):
    assert scores["qadapter"] > scores["frozen"], scores
