"""P4, search efficiency: hypervolume against trial-epochs spent, for each search strategy replayed on recorded curves.

Usage:
    python bench/search_efficiency.py                      # 10 repetitions x 10 strategies, 150 trial-epochs each
    python bench/search_efficiency.py --repetitions 2 --budget 100 --strategies random budget+moasha --grace-epochs 3

Every study runs through the real stack: a Ray Tune ``Tuner`` with the study's own searcher
(``study/tuner.py::make_searcher``, two objectives) and, for ``+moasha``, its scheduler
(``study/scheduler.py``). The samplers are the study's (Optuna's random, TPE and NSGA-II, and
the budget-aware sampler, ``study/budget.py``) and, as an anchor, Optuna's ``GPSampler``
(multi-objective LogEHVI; not a study option, as it needs torch). Trials are
``study/replay.py``'s replay of ``bench/data/tiny_curves.json`` (``bench/record_curves.py``: every
method of ``search_spaces/every_method_tiny.yaml``, two training seeds per config; each study
draws one seed's curve per config), so a study of hundreds of trial-epochs takes seconds, and
``--jobs`` studies run at a time, each its own Tune driver on one Ray instance.

Each study gets the same budget of trial-epochs (every epoch a trial trained, stopped trials'
included); the hypervolume after ``e`` trial-epochs is that of the trials that completed every
epoch by then (a stopped trial never counts), with ``analysis/pareto.py::hypervolume``. The
primary figure is in the plane the question lives in, (log10 trainable parameters, CIDEr);
the linear plane is reported beside it. The reference point is fixed: CIDEr 0 and 1.1 x the
largest count the space can sample (full fine-tuning); each hypervolume prints as a share of
the box from that point to (the table's best mean CIDEr, the space's smallest count).
Prints the table, how well a rung's CIDEr ranks the configs (what limits early stopping), and
writes the plot and every run's completions as JSON. Needs $QSTUDY_HOME with the tiny base
(its shapes count parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "bench" / "data" / "tiny_curves.json"
SPACE = REPO / "search_spaces" / "every_method_tiny.yaml"
SAMPLERS = ("random", "tpe", "nsga2", "gp", "budget")
STRATEGIES = SAMPLERS + tuple(f"{sampler}+moasha" for sampler in SAMPLERS)
PLANES = ("log", "linear")  # the hypervolume's parameter axis: log10 (primary) or linear
DEFAULT_PLOT = REPO / "bench" / "data" / "search_efficiency.png"


def replay_space_data(strategy: str, seed: int, concurrency: int, rungs: tuple[int, int] = (1, 3)) -> dict:
    """The every-method space set up for one strategy and seed; ``rungs``: MOASHA's (grace_epochs, reduction_factor)."""
    sampler, _, scheduler = strategy.partition("+")
    return {**yaml.safe_load(SPACE.read_text()), "study": "search-efficiency",
            "sampler": "random" if sampler == "gp" else sampler, "seed": seed, "concurrency": concurrency,
            "scheduler": scheduler or "none", "grace_epochs": rungs[0], "reduction_factor": rungs[1]}


def anchor_sampler(strategy: str, seed: int):
    """Optuna's GPSampler for ``gp`` (started like the study's TPE); None: the space's own sampler."""
    if strategy.partition("+")[0] != "gp":
        return None
    import optuna

    from qstudy.study.search import TPE_STARTUP_TRIALS

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)


def _stopper_base():
    from ray.tune import Stopper

    return Stopper


class Budget(_stopper_base()):
    """Tune stopper: ends the study after ``budget`` reported epochs; logs every completed trial's objectives."""

    def __init__(self, budget: int, epochs: int):
        self.budget, self.epochs = budget, epochs
        self.spent = 0
        self.completed: list[tuple[int, float, int]] = []  # (trial-epochs spent when it completed, CIDEr, params)
        self.trained: dict[str, int] = {}  # trial id -> epochs it has reported so far

    def __call__(self, trial_id: str, result: dict) -> bool:
        if "epoch" not in result or result.get("done"):  # Tune repeats a finished trial's last result, done
            return False
        # A replayed trial reports its decision epochs only (study/replay.py): count the ones between.
        self.spent += result["epoch"] + 1 - self.trained.get(trial_id, 0)
        self.trained[trial_id] = result["epoch"] + 1
        if result["epoch"] + 1 == self.epochs and self.spent <= self.budget:
            self.completed.append((self.spent, float(result["cider"]), int(result["trainable_params"])))
        return self.spent >= self.budget

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def run_one(strategy: str, seed: int, budget: int, concurrency: int, storage_dir: Path, table: Path,
            rung_settings: tuple[int, int]) -> dict:
    """One replayed study; its completed trials in order and what it spent."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from qstudy.study.replay import replay_trial
    from qstudy.study.scheduler import rungs
    from qstudy.study.space import parse_space
    from qstudy.study.tuner import make_scheduler, make_searcher

    space = parse_space(replay_space_data(strategy, seed, concurrency, rung_settings), "search-efficiency",
                        base_dir=REPO)
    epochs, settings = space.base["train"]["epochs"], space.settings
    stopper = Budget(budget, epochs)
    searcher = make_searcher(space, f"{strategy}-{seed}", None, None, sampler=anchor_sampler(strategy, seed))
    decided = rungs(settings.grace_epochs, settings.reduction_factor, epochs) if settings.scheduler == "moasha" else []
    report_epochs = tuple(milestone - 1 for milestone in decided) + (epochs - 1,)
    trainable = tune.with_resources(
        tune.with_parameters(replay_trial, table_path=str(table), report_epochs=report_epochs, noise_seed=seed),
        {"CPU": 1})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency),
                                    scheduler=make_scheduler(space, None), num_samples=budget, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{strategy}-{seed}", storage_path=str(storage_dir), stop=stopper,
                                  verbose=0, checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
    tuner.fit()
    return {"strategy": strategy, "seed": seed, "spent": min(stopper.spent, budget), "completed": stopper.completed,
            "trials": len(stopper.trained)}


def _job(strategy: str, seed: int, budget: int, concurrency: int, address: str, references: dict, table: Path,
         rung_settings: tuple[int, int]) -> dict:
    """One study in a pool process, a driver of its own on the shared Ray instance (Tune waits more than it computes)."""
    import ray

    if not ray.is_initialized():
        _quiet()
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        result = run_one(strategy, seed, budget, concurrency, Path(storage), table, rung_settings)
    result["curves"] = {plane: hypervolume_curve(result["completed"], budget, reference, plane == "log")
                        for plane, reference in references.items()}
    result["seconds"] = time.perf_counter() - started
    return result


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "3600")  # nothing here is ever resumed
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # nor read back from per-trial files


def hypervolume_curve(completed: list[tuple[int, float, int]], budget: int, reference: tuple[float, float],
                      log: bool) -> list[float]:
    """Hypervolume after each trial-epoch ``0..budget`` of the trials completed by then (``log``: in log10 parameters)."""
    from qstudy.analysis.pareto import hypervolume, pareto_front
    from qstudy.records import TrialRecord

    curve, front, events = [], [], iter(sorted(completed))
    pending = next(events, None)
    value = 0.0
    for spent in range(budget + 1):
        changed = False
        while pending is not None and pending[0] <= spent:
            _, cider, params = pending
            size = math.log10(params) if log else params
            front = pareto_front([*front, TrialRecord(str(len(front)), "", "", {}, cider, size, None, "FINISHED")])
            pending, changed = next(events, None), True
        if changed:
            value = hypervolume(front, reference)
        curve.append(value)
    return curve


def reach(curve: list[float], target: float) -> int | None:
    """The first trial-epoch count at which ``curve`` reaches ``target``."""
    return next((spent for spent, value in enumerate(curve) if value >= target - 1e-9), None)


def plot(curves: dict[str, list[list[float]]], budget: int, target: float, path: Path, title: str) -> None:
    import plotly.graph_objects as go

    figure = go.Figure()
    x = list(range(budget + 1))
    for strategy, runs in curves.items():
        mean = [statistics.mean(values) for values in zip(*runs)]
        sd = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in zip(*runs)]
        figure.add_trace(go.Scatter(x=x, y=mean, name=strategy, mode="lines", legendgroup=strategy))
        figure.add_trace(go.Scatter(x=x + x[::-1], y=[m + d for m, d in zip(mean, sd)] + [m - d for m, d in zip(mean, sd)][::-1],
                                    fill="toself", line={"width": 0}, opacity=0.15, showlegend=False,
                                    hoverinfo="skip", legendgroup=strategy))
    figure.add_hline(y=target, line_dash="dot", annotation_text="random's final mean hypervolume")
    figure.add_vline(x=budget / 3, line_dash="dash", annotation_text="1/3 of the budget")
    figure.update_layout(title=title, xaxis_title="cumulative trial-epochs",
                         yaxis_title="hypervolume, share of the box (mean ± sd)",
                         width=900, height=520, template="plotly_white")
    figure.write_image(str(path))


def rank_correlation(first: list[float], second: list[float]) -> float:
    """Spearman's rho (average ranks for ties): how well a rung's CIDEr orders the configs as their last epoch does."""
    import numpy as np

    def ranks(values: list[float]):
        values = np.asarray(values, dtype=float)
        result = np.empty(len(values))
        result[values.argsort(kind="stable")] = np.arange(len(values))
        for value in np.unique(values):
            result[values == value] = result[values == value].mean()
        return result

    return float(np.corrcoef(ranks(first), ranks(second))[0, 1])


def fidelity_report(table_path: Path, milestones: list[int]) -> list[str]:
    """What limits early stopping on this table: does a rung's CIDEr predict the final one?"""
    from qstudy.study.replay import CurveTable

    table = CurveTable.load(table_path)
    final = [curve.cider[-1] for curve in table.curves]
    lines = []
    for milestone in milestones:
        at_rung = [curve.cider[milestone - 1] for curve in table.curves]
        top = sorted(range(len(final)), key=lambda i: -final[i])[: max(1, len(final) // 9)]
        kept = sorted(range(len(at_rung)), key=lambda i: -at_rung[i])[: math.ceil(len(at_rung) / 3)]
        lines.append(f"rung {milestone} epochs: Spearman rho (CIDEr there vs at epoch {table.epochs}) "
                     f"{rank_correlation(at_rung, final):.2f} over {len(final)} configs; of the top "
                     f"{len(top)} final configs, {len(set(top) & set(kept))} are in the top third at the rung")
    return lines


def config_means(table: dict) -> list[tuple[float, int]]:
    """(final CIDEr averaged over its seeds, trainable count) of each recorded config."""
    by_config: dict[str, list] = {}
    for row in table["configs"]:
        key = json.dumps([row["method"], row["values"]], sort_keys=True)
        by_config.setdefault(key, []).append((row["cider"][-1], row["trainable_params"]))
    return [(statistics.mean(c for c, _ in rows), rows[0][1]) for rows in by_config.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--budget", type=int, default=150, help="trial-epochs per study")
    parser.add_argument("--concurrency", type=int, default=4, help="trials at a time in a study")
    parser.add_argument("--jobs", type=int, default=6, help="studies at a time, each its own Tune driver")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--grace-epochs", type=int, default=1, help="MOASHA's first rung")
    parser.add_argument("--reduction-factor", type=int, default=3, help="MOASHA keeps 1/this at a rung")
    parser.add_argument("--table", type=Path, default=TABLE, help="recorded curves (bench/record_curves.py)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "data" / "search_efficiency.json")
    args = parser.parse_args()
    _quiet()
    import ray

    from qstudy.study.space import parse_space, smallest_trainable

    full = parse_space(replay_space_data("random", 0, 1), "search-efficiency", base_dir=REPO)
    largest = max(full.run_config(arm.method, {p.key: p.extremes()[-1] for p in arm.params})
                  .adapter.count_trainable(full.dims) for arm in full.arms)
    smallest = min(smallest_trainable(full, arm) for arm in full.arms)
    references = {"log": (0.0, math.log10(1.1 * largest)), "linear": (0.0, 1.1 * largest)}
    table = json.loads(args.table.read_text())
    means = config_means(table)
    best = max(cider for cider, _ in means)
    boxes = {"log": best * (references["log"][1] - math.log10(smallest)), "linear": best * (references["linear"][1] - smallest)}
    oracle = {plane: hypervolume_curve([(0, cider, params) for cider, params in means], 0, references[plane],
                                       plane == "log")[-1] / boxes[plane] for plane in PLANES}
    context = ray.init(num_cpus=args.jobs * args.concurrency, include_dashboard=False, configure_logging=False,
                       log_to_driver=False)
    started = time.perf_counter()
    jobs = [(strategy, seed) for seed in range(args.repetitions) for strategy in args.strategies]
    runs = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, strategy, seed, args.budget, args.concurrency, context.address_info["address"],
                               references, args.table, (args.grace_epochs, args.reduction_factor))
                   for strategy, seed in jobs]
        for future in as_completed(futures):
            result = future.result()
            result["curves"] = {plane: [value / boxes[plane] for value in curve]
                                for plane, curve in result["curves"].items()}
            runs.append(result)
            print(f"{result['strategy']:14s} seed {result['seed']}: {result['trials']:3d} trials, "
                  f"{len(result['completed']):3d} completed, final hypervolume {result['curves']['log'][-1]:.3f} (log) "
                  f"{result['curves']['linear'][-1]:.3f} (linear)  ({result['seconds']:.0f} s)", flush=True)
    ray.shutdown()
    runs.sort(key=lambda r: (args.strategies.index(r["strategy"]), r["seed"]))

    baseline = "random" if "random" in args.strategies else args.strategies[0]
    print(f"\n{args.repetitions} repetitions, budget {args.budget} trial-epochs, concurrency {args.concurrency}, "
          f"MOASHA grace_epochs {args.grace_epochs}, reduction_factor {args.reduction_factor}; reference point CIDEr 0, "
          f"{references['linear'][1]:,.0f} trainable params (1.1 x full fine-tuning); box up to the table's best mean "
          f"CIDEr {best:.3f} and the space's smallest count {smallest:,}; {len(table['configs'])} recorded curves of "
          f"{len(means)} configs; {time.perf_counter() - started:.0f} s in all, {args.jobs} studies at a time")
    summary = {}
    for plane in PLANES:
        curves = {s: [r["curves"][plane] for r in runs if r["strategy"] == s] for s in args.strategies}
        target = statistics.mean(curve[-1] for curve in curves[baseline])
        print(f"\nhypervolume in {plane} parameters (share of the box; every recorded config's mean run to the end: "
              f"{oracle[plane]:.3f}); target: {baseline}'s final mean {target:.3f}\n")
        print("| strategy | trials (mean) | completed (mean) | final hypervolume mean ± sd | at 1/3 of the budget | "
              f"trial-epochs to {baseline}'s final (mean curve) | per repetition |")
        print("|---|---:|---:|---:|---:|---:|---|")
        summary[plane] = {"target": target, "strategies": {}}
        for strategy, strategy_curves in curves.items():
            mine = [r for r in runs if r["strategy"] == strategy]
            finals = [curve[-1] for curve in strategy_curves]
            reached = reach([statistics.mean(values) for values in zip(*strategy_curves)], target)
            each = [reach(curve, target) for curve in strategy_curves]
            third = [curve[args.budget // 3] for curve in strategy_curves]
            summary[plane]["strategies"][strategy] = {
                "final_mean": statistics.mean(finals), "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "third_mean": statistics.mean(third), "reached_at": reached, "reached_each": each}
            print(f"| {strategy} | {statistics.mean(r['trials'] for r in mine):.1f} | "
                  f"{statistics.mean(len(r['completed']) for r in mine):.1f} | "
                  f"{statistics.mean(finals):.3f} ± {summary[plane]['strategies'][strategy]['final_sd']:.3f} | "
                  f"{statistics.mean(third):.3f} | {reached if reached is not None else 'not reached'} | "
                  f"{' '.join('-' if e is None else str(e) for e in each)} |")
        if plane == "log":
            plot(curves, args.budget, target, args.plot,
                 f"Hypervolume in log10 parameters vs trial-epochs ({args.repetitions} repetitions each, replayed curves)")
    from qstudy.study.scheduler import rungs

    print("\nwhat limits early stopping here (the recorded table, CIDEr only):")
    for line in fidelity_report(args.table, rungs(args.grace_epochs, args.reduction_factor,
                                                  full.base["train"]["epochs"])):
        print(f"  {line}")
    args.out.write_text(json.dumps({"budget": args.budget, "references": references, "boxes": boxes, "oracle": oracle,
                                    "grace_epochs": args.grace_epochs, "reduction_factor": args.reduction_factor,
                                    "repetitions": args.repetitions, "concurrency": args.concurrency,
                                    "summary": summary, "runs": [{k: v for k, v in r.items() if k != "curves"}
                                                                 for r in runs]}, indent=1))
    print(f"\nplot: {args.plot}\nruns: {args.out}")


if __name__ == "__main__":
    main()
