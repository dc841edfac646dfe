"""Val CIDEr of Q-Adapter against its two floors on the synthetic target domain, over everything a result varies with.

Usage:
    python bench/cider_ordering.py                                 # the grid: base seeds 0 1 x threads 1 2 x seeds 0 1 2
    python bench/cider_ordering.py --base-seeds 0 --threads 2 --seeds 0
    python bench/cider_ordering.py --jobs 2                        # two runs at a time (same scores, sooner)

A training seed changes neither the base nor the arithmetic, so a spread over seeds alone
understates how far a score moves. The grid also rebuilds the base with seeds of its own
(its source clips, initialisation and data order) and runs every cell with 1 and 2 CPU
threads (which split reductions differently). Each arm's mean, spread and range is over every
cell; the ordering blind < frozen < qadapter is checked cell by cell.

The floors: *blind* (full fine-tuning with the video blanked: only the caption prior can be
learnt) and *frozen* (the pretrained base with only the projector trained). Beside CIDEr,
the share of val captions naming the clip's colour, shape and direction says what each arm
reads from the video. Needs $QSTUDY_HOME (`qstudy demo` or `qstudy base` prepares it); bases
of other seeds are built under $QSTUDY_HOME/base/tiny-seedN.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ARMS = ("blind", "frozen", "qadapter")


def arm_config(arm: str, base_seed: int, seed: int, output_dir: Path):
    """The tiny preset (a Q-Adapter run) on the base of ``base_seed``, or one of its floors, for one seed."""
    from qstudy.cli import DEMO_CONFIG, tiny_base_dir
    from qstudy.config import RunConfig
    from qstudy.train.pretrain import BaseSpec, pretrain_base
    from qstudy.train.floors import floor_config

    config = RunConfig.from_yaml(DEMO_CONFIG)
    base = pretrain_base(tiny_base_dir(base_seed), BaseSpec(seed=base_seed))  # built already: only read
    config.model.vision_encoder, config.model.language_model = base.vision_encoder, base.language_model
    config.model.projector = base.projector
    config.train.seed = seed
    config.eval.meteor = False  # CIDEr decides; METEOR's JVM would only add time
    config.output_dir = str(output_dir / f"{arm}-base{base_seed}-seed{seed}")
    return config if arm == "qadapter" else floor_config(config, arm)


def attributes(config) -> dict[str, float]:
    """Attribute accuracy of the trained run's val captions."""
    from qstudy.data.synthetic import attribute_accuracy
    from qstudy.export import load_trained
    from qstudy.train.recipe import load_split, predict

    captioner = load_trained(config, Path(config.output_dir) / "adapter.safetensors")
    val = load_split(config.data, config.data.val_split, captioner.image_size, config.data.max_val_clips, progress=False)
    return attribute_accuracy(predict(captioner, val, config.eval), config.data.annotations)


def run_arm(arm: str, base_seed: int, threads: int, seed: int, output_dir: Path) -> tuple[float, dict[str, float], float]:
    """(val CIDEr, attribute accuracy, seconds) of one arm in one cell; runs in a worker process."""
    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.train.engine import cpu_threads
    from qstudy.train.recipe import run

    quiet_weight_loading()
    config = arm_config(arm, base_seed, seed, output_dir)
    started = time.perf_counter()
    with cpu_threads(threads):
        cider = run(config, progress=False).final["cider"]
        read = attributes(config)
    return cider, read, time.perf_counter() - started


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f} | {min(values):.3f}..{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    args = parser.parse_args()
    # Sleeping, not spinning, OpenMP workers: the same arithmetic, but a 2-thread run beside
    # another does not slow to a crawl. Set before any torch loads OpenMP (workers inherit it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from qstudy.cli import tiny_base_dir
    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.train.pretrain import BaseSpec, pretrain_base

    quiet_weight_loading()
    for base_seed in args.base_seeds:  # before any run, so that no two workers build one base
        pretrain_base(tiny_base_dir(base_seed), BaseSpec(seed=base_seed))
    cells = list(itertools.product(args.base_seeds, args.threads, args.seeds))
    scores: dict[tuple, dict[str, float]] = {cell: {} for cell in cells}
    reads: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = {pool.submit(run_arm, arm, *cell, Path(tmp)): (cell, arm) for cell in cells for arm in ARMS}
        for future in as_completed(runs):
            (base_seed, threads, seed), arm = runs[future]
            cider, read, seconds = future.result()
            scores[(base_seed, threads, seed)][arm] = cider
            reads[arm].append(read)
            print(f"base {base_seed} threads {threads} seed {seed} {arm:9s} CIDEr {cider:.3f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in read.items()) + f"  {seconds:.0f} s", flush=True)

    print(f"\n{len(cells)} cells: base seeds {args.base_seeds} x threads {args.threads} x seeds {args.seeds}")
    print("\n| base seed | threads | seed | blind | frozen | qadapter |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cell, by_arm in scores.items():
        print(f"| {' | '.join(map(str, cell))} | " + " | ".join(f"{by_arm[arm]:.3f}" for arm in ARMS) + " |")
    print("\n| arm | val CIDEr mean ± sd | min..max | colour | shape | direction |")
    print("|---|---:|---|---:|---:|---:|")
    for arm in ARMS:
        values = [cell[arm] for cell in scores.values()]
        read = {k: statistics.mean(r[k] for r in reads[arm]) for k in ("colour", "shape", "direction")}
        print(f"| {arm} | {summary(values)} | {read['colour']:.2f} | {read['shape']:.2f} | {read['direction']:.2f} |")
    ordered = [cell for cell in scores.values() if cell["blind"] < cell["frozen"] < cell["qadapter"]]
    gaps = {name: [cell[high] - cell[low] for cell in scores.values()]
            for name, (low, high) in {"frozen - blind": ("blind", "frozen"), "qadapter - frozen": ("frozen", "qadapter")}.items()}
    spread = max(statistics.stdev([cell[arm] for cell in scores.values()]) if len(scores) > 1 else 0.0
                 for arm in ("frozen", "qadapter"))
    mean_gap = statistics.mean(gaps["qadapter - frozen"])
    print(f"\nblind < frozen < qadapter in {len(ordered)} of {len(scores)} cells; "
          + "; ".join(f"{name}: mean {statistics.mean(v):.3f}, smallest {min(v):.3f}" for name, v in gaps.items())
          + f"; largest sd of frozen, qadapter {spread:.3f} "
          f"(qadapter - frozen mean / sd = {mean_gap / spread if spread else float('inf'):.1f}, target >= 3)")


if __name__ == "__main__":
    main()
