"""Helper of gpu_check.sh: writes the data, base and run configs of its trials, then tabulates their metrics.json.

    python bench/gpu_check.py prepare {paper,tiny} {bf16,fp32} WORKERS DIR   # -> DIR/single.yaml, DIR/zero2.yaml
    python bench/gpu_check.py summary DIR/single.yaml:1 DIR/zero2.yaml:2   # CONFIG:WORKERS of each run

Paper scale is step_cost.py's (CLIP ViT-B/16 + GPT-2 124M from configs, random weights, 8 frames at
224 px, batch 2); tiny is the tiny preset's towers. The clips are the synthetic ones (32 px, resized
to the encoder's size by the decoder). Step time and throughput come from the last epoch: the
first pays for CUDA/DeepSpeed warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from step_cost import PRESETS, build_models

EPOCHS = 2
STEPS_PER_EPOCH = 8


def prepare(preset: str, precision: str, workers: int, directory: Path) -> None:
    """Synthetic clips, a random-weight base and the two run configs (one worker; ZeRO-2) under ``directory``."""
    from qstudy.data import synthetic

    frames, batch = PRESETS[preset]
    # Enough (clip, caption) pairs in the train split (70% of the clips) that every epoch has
    # STEPS_PER_EPOCH full steps on every rank, and a few val clips.
    pairs = workers * batch * STEPS_PER_EPOCH
    spec = synthetic.SyntheticSpec(num_clips=2 * pairs // synthetic.SyntheticSpec.captions_per_clip + 8)
    annotations = synthetic.generate(directory / "data", spec, progress=False)
    model = build_models(preset, directory / "base")
    for name, distributed in (("single", {}), ("zero2", {"deepspeed": True, "zero_stage": 2})):
        config = {
            "data": {"annotations": str(annotations), "video_dir": str(directory / "data" / "videos"),
                     "num_frames": frames, "image_size": 224 if preset == "paper" else None, "max_val_clips": 2,
                     "cache_dir": str(directory / "cache"), "batching": "pairs"},  # P1's batch: 2 pairs
            "model": {key: value for key, value in asdict(model).items() if value is not None},
            "adapter": {"method": "qadapter"},
            "train": {"epochs": EPOCHS, "batch_size": batch, "max_steps_per_epoch": STEPS_PER_EPOCH,
                      "precision": precision, "log_every": STEPS_PER_EPOCH, **distributed},
            "eval": {"meteor": False, "max_new_tokens": 4, "batch_size": 2},
            "output_dir": str(directory / name),
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def summary(configs: list[Path], workers: list[int]) -> str:
    """A markdown row per run from its metrics.json: step time, samples/s over all workers, peak GPU memory."""
    rows = ["| run | workers | precision | step s | samples/s | peak GPU memory MiB |", "|---|---:|---|---:|---:|---:|"]
    for path, world in zip(configs, workers):
        config = yaml.safe_load(path.read_text())
        last = json.loads((Path(config["output_dir"]) / "metrics.json").read_text())["epochs"][-1]
        train = config["train"]
        samples = last["train_steps"] * train["batch_size"] * train.get("gradient_accumulation_steps", 1) * world
        peak = "n/a (CPU)" if last["peak_memory_mb"] is None else f"{last['peak_memory_mb']:,.0f}"
        engine = f"ZeRO-{train['zero_stage']}" if train.get("deepspeed") else "plain"
        rows.append(f"| {path.stem} ({engine}) | {world} | {train['precision']} | "
                    f"{last['train_seconds'] / last['train_steps']:.3f} | {samples / last['train_seconds']:.1f} | {peak} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("preset", choices=["paper", "tiny"])
    prep.add_argument("precision", choices=["bf16", "fp32"])
    prep.add_argument("workers", type=int)
    prep.add_argument("directory", type=Path)
    summ = commands.add_parser("summary")
    summ.add_argument("runs", nargs="+", metavar="CONFIG:WORKERS")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.preset, args.precision, args.workers, args.directory)
    else:
        runs = [run.rpartition(":") for run in args.runs]
        print(summary([Path(path) for path, _, _ in runs], [int(world) for _, _, world in runs]))


if __name__ == "__main__":
    sys.exit(main())
