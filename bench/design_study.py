"""Q-Adapter's readings side by side on the tiny task: each reading's best config by search, then over the floors' variance grid.

Usage:
    python bench/design_study.py                               # 6 trials a reading, then the 12-cell grid
    python bench/design_study.py --trials 4 --threads 1        # a smaller study
    python bench/design_study.py --out DIR                     # runs kept under DIR; a rerun skips finished ones
    python bench/design_study.py --pareto dashboards/screenshots/design_study_pareto.png

Search: ``search_spaces/qadapter_design.yaml``'s Q-Adapter arm, one Optuna study per reading
(its placement pinned; ``gated_attention`` also gets its ``per_head`` gate, which the shared arm
cannot offer), through the study's own ``SpaceSampler``, so ``rank`` and ``gating`` are
sampled only where the reading uses them. A trial trains its config on both bases (seeds 0
and 1, training seed 0, one thread) and scores the mean val CIDEr: the question is which
reading holds on both bases, so the best config is chosen for it, not for one base.

Grid: each reading's best config, the frozen floor and LoRA (its tiny-curves best, fixed:
rank 8 on the vision tower, lr 4.2e-3) over ``bench/cider_ordering.py``'s grid (base seeds x
threads x training seeds). A reading *beats frozen* on a base when its mean gap to frozen over
that base's cells is more than 3x the larger of the two arms' sd over those cells, and the
table says whether that holds on both bases. Every run is one process's turn, one at a time;
each run's metrics.json stays under ``--out``, so ``bench/encoder_probe.py --adapted`` can read
the best configs' runs. ``--pareto PNG`` draws the dashboards' Pareto view (dashboards/pareto.yaml)
of every search trial, at its mean CIDEr over the bases, beside frozen and LoRA in the grid's
first cell (training seed 0, one thread, the same mean). Needs $QSTUDY_HOME (`qstudy demo` or `qstudy base`); the base of seed 1
is built under $QSTUDY_HOME/base/tiny-seed1 if missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "qadapter_design.yaml"
READINGS = ("side", "gated_attention", "sequence")
# LoRA's best tiny-curves config (bench/data/tiny_curves.json) among the fast ones: a reference, not searched here.
LORA = {"adapter.method": "lora", "adapter.rank": 8, "adapter.target": "vision", "train.learning_rate": 0.0042}
FROZEN = {"adapter.method": "frozen", "train.learning_rate": 0.002}
SEARCH_SEED = 0  # the training seed of search trials (the grid's seeds are its own)


def reading_space(placement: str):
    """The design space's Q-Adapter arm with ``placement`` pinned (gated attention may also gate per head)."""
    from qstudy.core.validate import load_yaml
    from qstudy.study.space import parse_space

    data = load_yaml(SPACE)
    arm = data["arms"]["qadapter"]
    arm["adapter.placement"] = placement
    if placement == "gated_attention":
        arm["adapter.gating"] = {"choices": [*arm["adapter.gating"]["choices"], "per_head"]}
    data["arms"] = {"qadapter": arm}
    data["seed"] = SEARCH_SEED
    return parse_space(data, str(SPACE), base_dir=SPACE.parent)


def on_base(config_dict: dict, base_seed: int) -> dict:
    """A run config mapping moved onto the tiny base of ``base_seed``."""
    from qstudy.cli import tiny_base_dir
    from qstudy.train.pretrain import BaseSpec, pretrain_base

    base = pretrain_base(tiny_base_dir(base_seed), BaseSpec(seed=base_seed))  # built already: only read
    data = copy.deepcopy(config_dict)
    data["model"].update(vision_encoder=base.vision_encoder, language_model=base.language_model,
                         projector=base.projector)
    return data


def train(config_dict: dict, output_dir: Path, threads: int, seed: int) -> dict:
    """{cider, trainable_params, seconds} of one run; a finished run's metrics.json is read back instead."""
    from qstudy.config import RunConfig
    from qstudy.train.engine import cpu_threads
    from qstudy.train.recipe import run

    metrics = output_dir / "metrics.json"
    if not metrics.exists():
        data = copy.deepcopy(config_dict)
        data["train"]["seed"], data["output_dir"] = seed, str(output_dir)
        data["eval"]["meteor"] = False  # CIDEr decides; METEOR's JVM would only add time
        with cpu_threads(threads):
            run(RunConfig.from_dict(data), progress=False)
    recorded = json.loads(metrics.read_text())
    return {"cider": recorded["final"]["cider"], "trainable_params": recorded["trainable_params"],
            "seconds": recorded["wall_seconds"]}


def search(placement: str, trials: int, base_seeds: list[int], out: Path) -> dict:
    """The reading's best config by mean val CIDEr over the bases: {values, trainable_params, cider by base, trials}."""
    import optuna

    from qstudy.study.search import make_sampler
    from qstudy.study.space import SampledConfig, SpaceSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = reading_space(placement)
    sampler = SpaceSampler(space)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space))
    records = []
    for number in range(trials):
        trial = study.ask()
        sampled = SampledConfig.from_tune_config(sampler(trial))
        config = sampled.run_config.to_dict()
        scores = {base: train(on_base(config, base), out / "search" / placement / f"trial{number}-base{base}", 1,
                              SEARCH_SEED)["cider"] for base in base_seeds}
        mean = statistics.mean(scores.values())
        study.tell(trial, mean)
        records.append({"values": sampled.values, "trainable_params": sampled.trainable_params,
                        "cider": scores, "mean": mean, "params": trial.params})
        print(f"search {placement} trial {number}: " + " ".join(f"base {b} {c:.3f}" for b, c in scores.items())
              + f"  {sampled.trainable_params} params  {json.dumps(sampled.values)}", flush=True)
    number = max(range(trials), key=lambda index: records[index]["mean"])
    return {**records[number], "number": number, "config": space.run_config("qadapter", records[number]["values"]).to_dict(),
            "trials": records}


def arm_config(values: dict) -> dict:
    """The design space's base run config with an arm's dotted values (``adapter.method`` included) applied."""
    from qstudy.study.space import set_dotted

    space = reading_space("side")
    data = copy.deepcopy(space.base)
    data["adapter"] = {}
    for key, value in values.items():
        set_dotted(data, key, value)
    return data


def verdict(arm: list[tuple], frozen: list[tuple], base_seeds: list[int]) -> tuple[str, bool]:
    """Per base: mean gap to frozen over its cells against 3x the larger sd of the two there, and the cells won."""
    parts, holds = [], True
    for base in base_seeds:
        mine = [score for cell, score in arm if cell[0] == base]
        floor = [score for cell, score in frozen if cell[0] == base]
        gap = statistics.mean(mine) - statistics.mean(floor)
        spread = max(statistics.stdev(mine), statistics.stdev(floor)) if len(mine) > 1 else 0.0
        holds &= gap > 3 * spread
        won = sum(score > low for score, low in zip(mine, floor))  # both lists follow the cells' order
        parts.append(f"base {base}: {gap:+.3f} vs 3 x {spread:.3f}, ahead in {won}/{len(mine)} cells")
    return "; ".join(parts), holds


def pareto_png(best: dict, scores: dict[str, list[tuple]], params: dict[str, int], path: Path) -> None:
    """The dashboards' Pareto view of the search trials and the two references, written to ``path``."""
    import dataclasses
    import shutil
    import tempfile

    from qstudy.analysis.dashboards import write_dashboards
    from qstudy.analysis.pareto import analyse
    from qstudy.analysis.views import default_views_dir, load_views
    from qstudy.records import TrialRecord

    records = [TrialRecord(trial_id=f"{placement}-{number}", study="qadapter-design", method=f"qadapter-{placement}",
                           params={k: v for k, v in trial["values"].items() if k != "adapter.placement"},
                           cider=trial["mean"], trainable_params=trial["trainable_params"], total_params=None,
                           status="FINISHED")
               for placement, found in best.items() for number, trial in enumerate(found["trials"])]
    for arm in ("frozen", "lora"):
        first = [score for (_base, threads, seed), score in scores[arm] if (threads, seed) == (1, SEARCH_SEED)]
        records.append(TrialRecord(trial_id=arm, study="qadapter-design", method=arm, params={},
                                   cider=statistics.mean(first), trainable_params=params[arm], total_params=None,
                                   status="FINISHED"))
    records = [dataclasses.replace(record, order=order) for order, record in enumerate(records)]
    view = next(view for view in load_views(default_views_dir()) if view.view == "pareto")
    view = dataclasses.replace(view, title="Q-Adapter's readings: val CIDEr (mean of bases 0 and 1) vs trainable parameters",
                               description="Every search trial of each reading, and the frozen floor and LoRA, "
                                           "trained with seed 0 on one thread on the tiny task's two bases.")
    with tempfile.TemporaryDirectory() as tmp:
        written = write_dashboards(analyse(records), [view], tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(next(p for p in written if p.suffix == ".png"), path)
    print(f"\nPareto view: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="search trials per reading (each trains on every base)")
    parser.add_argument("--base-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--readings", nargs="+", default=list(READINGS), choices=READINGS)
    parser.add_argument("--out", type=Path, default=None, help="default: $QSTUDY_HOME/design-study")
    parser.add_argument("--pareto", type=Path, help="also write the Pareto view of the study to this PNG")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/cider_ordering.py: sleeping OpenMP workers

    from qstudy.cli import tiny_base_dir
    from qstudy.core.paths import qstudy_home
    from qstudy.model.quiet import quiet_weight_loading
    from qstudy.train.pretrain import BaseSpec, pretrain_base

    quiet_weight_loading()
    out = args.out or qstudy_home() / "design-study"
    for base in args.base_seeds:
        pretrain_base(tiny_base_dir(base), BaseSpec(seed=base))
    started = time.perf_counter()
    best = {placement: search(placement, args.trials, args.base_seeds, out) for placement in args.readings}
    (out / "best.json").write_text(json.dumps(best, indent=2))

    arms = {"frozen": arm_config(FROZEN), "lora": arm_config(LORA),
            **{f"qadapter-{placement}": found["config"] for placement, found in best.items()}}
    # Seeds outermost: a study stopped early has whole (base, threads) blocks of fewer seeds, each arm alike.
    cells = [(base, threads, seed) for seed in args.seeds for threads in args.threads for base in args.base_seeds]
    scores: dict[str, list[tuple]] = {arm: [] for arm in arms}
    params: dict[str, int] = {}
    for cell in cells:
        for arm, config in arms.items():
            base, threads, seed = cell
            found = best.get(arm.removeprefix("qadapter-"))
            # The search trained each best config in this cell already: the same run, bit for bit.
            done = found is not None and (threads, seed) == (1, SEARCH_SEED)
            directory = (out / "search" / found["values"]["adapter.placement"] / f"trial{found['number']}-base{base}"
                         if done else out / "grid" / f"{arm}-base{base}-t{threads}-seed{seed}")
            result = train(on_base(config, base), directory, threads, seed)
            scores[arm].append((cell, result["cider"]))
            params[arm] = result["trainable_params"]
            print(f"grid base {base} threads {threads} seed {seed} {arm:26s} CIDEr {result['cider']:.3f}  "
                  f"{result['seconds']:.0f} s", flush=True)

    print(f"\n{len(cells)} cells: base seeds {args.base_seeds} x threads {args.threads} x seeds {args.seeds}; "
          f"search {args.trials} trials a reading; {(time.perf_counter() - started) / 60:.0f} min")
    print("\n| arm | best config (searched) | trainable | val CIDEr mean ± sd | min..max | "
          "mean gap to frozen per base vs 3 x sd | beats frozen on both bases |")
    print("|---|---|---:|---:|---|---|---|")
    for arm, cells_scores in scores.items():
        values = [score for _cell, score in cells_scores]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        found = best.get(arm.removeprefix("qadapter-"))
        shown = ", ".join(f"{k.removeprefix('adapter.').removeprefix('train.')}={v:.4g}" if isinstance(v, float)
                          else f"{k.removeprefix('adapter.').removeprefix('train.')}={v}"
                          for k, v in (found["values"] if found else {}).items()) or "fixed"
        gaps, holds = verdict(cells_scores, scores["frozen"], args.base_seeds) if arm != "frozen" else ("", False)
        print(f"| {arm} | {shown} | {params[arm]:,} | {statistics.mean(values):.3f} ± {spread:.3f} | "
              f"{min(values):.3f}..{max(values):.3f} | {gaps} | {'yes' if holds else ('no' if gaps else '')} |")
    print("\n| base | threads | seed | " + " | ".join(scores) + " |")
    print("|---:|---:|---:|" + "---:|" * len(scores))
    for index, cell in sorted(enumerate(cells), key=lambda item: item[1]):
        print(f"| {' | '.join(map(str, cell))} | " + " | ".join(f"{scores[arm][index][1]:.3f}" for arm in scores) + " |")
    if args.pareto:
        pareto_png(best, scores, params, args.pareto)


if __name__ == "__main__":
    main()
