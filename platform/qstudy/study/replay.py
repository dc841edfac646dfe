"""Tabular replay: trials answered from recorded per-epoch val CIDEr curves instead of training (HPOBench/YAHPO style).

``bench/record_curves.py`` trains configs sampled from a tiny search space for real, each at a
few training seeds, and keeps every epoch's val CIDEr (``bench/data/tiny_curves.json``). A
replayed trial takes a curve of the recorded config of its method nearest to what the sampler
chose (categorical keys: one per differing value; numeric keys: their log distance over the
range recorded), so a sampler searching the real space gets real curves back in
milliseconds; which seed's curve is its ``draw``. Its trainable parameters stay the sampled
config's own closed-form count, as in a real trial.

Two entry points: :func:`run` stands in for ``train/recipe.py::run`` inside the study's own
trial (worker, MLflow, checkpoints: the whole study path, only the training is replayed),
and :func:`replay_trial` is a bare Tune function for benchmarks that run hundreds of
studies. Imports no torch.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPLAY_STATE = "replay.json"  # in a replayed trial's checkpoint: the epoch it closes


@dataclass(frozen=True)
class Curve:
    """One recorded training: its method, sampled values, training seed and per-epoch val CIDEr."""

    index: int
    method: str
    values: dict[str, Any]
    cider: tuple[float, ...]
    train_loss: tuple[float, ...]
    seed: int = 0


class CurveTable:
    """The recorded curves of one table file, looked up by nearest recorded config."""

    def __init__(self, data: dict, source: str = "<table>"):
        self.source = source
        self.epochs = int(data["epochs"])
        self.curves = [Curve(i, row["method"], row["values"], tuple(row["cider"]), tuple(row["train_loss"]),
                             row.get("seed", 0)) for i, row in enumerate(data["configs"])]
        short = [curve for curve in self.curves if len(curve.cider) < self.epochs]
        if short:
            raise ValueError(f"{source}: config {short[0].index} has {len(short[0].cider)} epochs of {self.epochs}")
        self._log_ranges: dict[tuple[str, str], float] = {}
        for curve in self.curves:
            for key, value in curve.values.items():
                if _is_number(value):
                    self._log_ranges.setdefault((curve.method, key), 0.0)
        for method, key in self._log_ranges:
            logs = [math.log(value) for c in self.curves if c.method == method
                    for value in [c.values.get(key)] if _is_number(value) and value > 0]
            self._log_ranges[(method, key)] = max(logs) - min(logs) if logs else 0.0

    @classmethod
    def load(cls, path: str | Path) -> "CurveTable":
        return cls(json.loads(Path(path).read_text()), str(path))

    def methods(self) -> set[str]:
        return {curve.method for curve in self.curves}

    def nearest(self, method: str, values: dict[str, Any], draw: int = 0) -> Curve:
        """A curve of the recorded config of ``method`` closest to ``values`` (the first recorded among equals).

        The config's curves, one per training seed, are taken in seed order: ``draw`` picks one (modulo their number).
        """
        candidates = [curve for curve in self.curves if curve.method == method]
        if not candidates:
            raise KeyError(f"{self.source}: no curve recorded for method {method!r} (recorded: {sorted(self.methods())})")
        closest = min(candidates, key=lambda curve: (self._distance(method, values, curve.values), curve.index))
        seeds = sorted((curve for curve in candidates if curve.values == closest.values), key=lambda curve: curve.seed)
        return seeds[draw % len(seeds)]

    def _distance(self, method: str, wanted: dict[str, Any], recorded: dict[str, Any]) -> float:
        distance = 0.0
        for key in wanted.keys() | recorded.keys():
            a, b = wanted.get(key), recorded.get(key)
            if _is_number(a) and _is_number(b) and a > 0 and b > 0:
                span = self._log_ranges.get((method, key)) or 1.0
                distance += min(1.0, abs(math.log(a) - math.log(b)) / span)
            else:
                distance += float(a != b)
        return distance


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@functools.lru_cache(maxsize=4)
def load_table(path: str) -> CurveTable:
    """One parse per process: every replayed trial of a study reads the same file."""
    return CurveTable.load(path)


# -- inside the study's own trial ---------------------------------------------------------------

@dataclass
class ReplayedEpoch:
    """The fields of ``recipe.EpochResult`` the study's worker reads."""

    epoch: int
    train_loss: float
    val: dict[str, float]
    seconds: float = 0.0


@dataclass
class ReplayedRun:
    """The fields of ``recipe.RunResult`` the study's worker reads."""

    method: str
    trainable_params: int
    total_params: int
    epochs: list[ReplayedEpoch]
    wall_seconds: float
    output_dir: str
    skipped_videos: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1].val if self.epochs else {}


def _dotted_values(config: dict, keys: set[str]) -> dict[str, Any]:
    values = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values


def make_run(table_path: str) -> Callable:
    """A stand-in for ``recipe.run`` that replays the nearest recorded curve of the trial's config, at its training seed."""

    def run(config, on_epoch=None, resume_from: Path | None = None, progress: bool = False) -> ReplayedRun:
        import tempfile

        from qstudy.study.space import read_dims

        started = time.perf_counter()
        mapping = config.to_dict()
        dims = read_dims(mapping, table_path)
        table = load_table(table_path)
        method = config.adapter.method
        keys = {key for curve in table.curves if curve.method == method for key in curve.values}
        curve = table.nearest(method, _dotted_values(mapping, keys), draw=config.train.seed)
        if config.train.epochs > table.epochs:
            raise ValueError(f"{table_path}: {table.epochs} epochs recorded, the trial asks for {config.train.epochs}")
        start = json.loads((resume_from / REPLAY_STATE).read_text())["epoch"] + 1 if resume_from else 0
        epochs = []
        for epoch in range(start, config.train.epochs):
            result = ReplayedEpoch(epoch, curve.train_loss[epoch], {"cider": curve.cider[epoch]})
            epochs.append(result)
            if on_epoch is not None:
                with tempfile.TemporaryDirectory() as checkpoint:
                    (Path(checkpoint) / REPLAY_STATE).write_text(json.dumps({"epoch": epoch, "curve": curve.index}))
                    on_epoch(result, Path(checkpoint))
        output = Path(config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps({"replayed_from": table_path, "curve": curve.index,
                                                         "cider": [e.val["cider"] for e in epochs]}, indent=1))
        _write_weightless_adapter(output / "adapter.safetensors", table_path, curve.index)
        return ReplayedRun(method, config.adapter.count_trainable(dims), dims.total_params, epochs,
                           time.perf_counter() - started, str(output))

    return run


def _write_weightless_adapter(path: Path, table_path: str, index: int) -> None:
    """A valid safetensors file with no tensors, whose metadata says it was replayed (nothing to export)."""
    header = json.dumps({"__metadata__": {"replayed_from": table_path, "curve": str(index)}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)


# -- a bare Tune function, for benchmarks -------------------------------------------------------

def replay_trial(config: dict, table_path: str, report_epochs: tuple[int, ...], noise_seed: int = 0) -> None:
    """Tune function: report a recorded curve of the sampled config's nearest at the 0-based ``report_epochs``.

    Which seed's curve a config gets is drawn from ``noise_seed`` and its values: fixed for a
    config within a study, and independent across studies of different ``noise_seed``, as
    trainings at another seed would be. A benchmark reports only the epochs where something is
    decided (the scheduler's rungs and the last): the searcher ignores intermediate results of
    a two-objective study and the scheduler acts on rungs only, so the decisions are those of a
    trial reporting every epoch, at a fraction of Tune's per-result cost. Whoever counts
    trial-epochs counts the epochs in between from ``epoch``.
    """
    import zlib

    from ray import tune

    from qstudy.study.space import SampledConfig

    sampled = SampledConfig.from_tune_config(config)
    draw = zlib.crc32(json.dumps([noise_seed, sampled.method, sampled.values], sort_keys=True).encode())
    curve = load_table(table_path).nearest(sampled.method, sampled.values, draw)
    for epoch in report_epochs:
        tune.report({"epoch": epoch, "cider": curve.cider[epoch], "trainable_params": sampled.trainable_params})
