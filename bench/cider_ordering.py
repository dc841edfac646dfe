"""Val CIDEr of Q-Adapter against its two floors on the synthetic target domain, over seeds.

Usage:
    python bench/cider_ordering.py                 # seeds 0 1 2, the tiny preset's settings
    python bench/cider_ordering.py --seeds 0 --epochs 2

The floors: *blind* (full fine-tuning with the video blanked: only the caption prior can be
learnt) and *frozen* (the pretrained base with only the projector trained). Q-Adapter must
clear both, which shows that the adapted vision encoder grounds the target domain's words.
Needs the tiny workspace ($QSTUDY_HOME; `qstudy demo` or `qstudy base` prepares it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ARMS = ("blind", "frozen", "qadapter")


def arm_config(arm: str, seed: int, output_dir: Path, epochs: int | None):
    """The tiny preset (a Q-Adapter run), or one of its floors, for one seed."""
    from qstudy.cli import DEMO_CONFIG
    from qstudy.config import RunConfig
    from qstudy.train.floors import floor_config

    config = RunConfig.from_yaml(DEMO_CONFIG)
    config.train.seed = seed
    config.train.epochs = epochs or config.train.epochs
    config.output_dir = str(output_dir / f"{arm}-seed{seed}")
    return config if arm == "qadapter" else floor_config(config, arm)


def main() -> None:
    import tempfile

    from qstudy.cli import _quiet_libraries
    from qstudy.train.recipe import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    _quiet_libraries()
    scores: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm in ARMS:
                started = time.perf_counter()
                result = run(arm_config(arm, seed, Path(tmp), args.epochs), progress=False)
                scores[arm].append(result.final["cider"])
                print(f"seed {seed} {arm:9s} CIDEr {result.final['cider']:.3f}  BLEU@4 {result.final['bleu4']:.3f}  "
                      f"{result.trainable_params:,} trainable  {time.perf_counter() - started:.0f} s", flush=True)
    print("\n| arm | val CIDEr (mean ± sd over seeds " + " ".join(map(str, args.seeds)) + ") | per seed |")
    print("|---|---:|---|")
    for arm, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {arm} | {statistics.mean(values):.3f} ± {spread:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
