"""P3 compute: an epoch's worth of data at paper scale with clip-grouped batches and frozen-prefix reuse, against per-pair batches.

Usage:
    python bench/compute_reuse.py                          # 2 clips x 20 captions, Q-Adapter last:2, LoRA (LM), frozen
    python bench/compute_reuse.py --clips 4 --steps 5 --threads 2

CLIP ViT-B/16 + GPT-2 124M from config classes with random weights (no download), 8 frames
of 224 px per clip, 20 MSR-VTT-length captions per clip, CPU fp32, the recipe's own batches
(``recipe.caption_batches``) and reuse (``recipe.reuse_frozen_prefix``). For each method three
ways to train on the same epoch (every (clip, caption) pair once):

- per pair: ``data.batching: pairs``, batches of ``--pair-batch`` pairs (P1's batch), the
  encoder once per pair (what batching by pairs costs);
- clip-grouped: batches of one clip with its 20 captions, the encoder once per clip;
- clip-grouped + reuse: the same, reading the clips' states after the frozen layers from the
  prefix cache, built once beforehand (its cost is reported apart: once per node and study).

A step of each is timed in turn (warm-up first, then ``--steps`` rounds), so load from other
jobs falls on all three alike; an epoch is the median step times the steps an epoch has.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # step_cost's paper-scale towers

FRAMES, CAPTIONS_PER_CLIP = 8, 20
METHODS = {
    "qadapter (last:2)": {"method": "qadapter", "insertion_layers": "last:2"},
    "lora (LM)": {"method": "lora", "target": "lm"},
    "frozen": {"method": "frozen"},
}


def split_of(clips: int, image_size: int):
    """Random frames and MSR-VTT-length captions (7-12 words) for ``clips`` clips, as the recipe holds a split."""
    import numpy as np

    from qstudy.data.annotations import Clip
    from qstudy.data.synthetic import caption_vocabulary
    from qstudy.train.recipe import MappedRows, SplitData

    rng = random.Random(0)
    words = caption_vocabulary()
    annotations = [Clip(f"clip{i}", Path(f"clip{i}.mp4"),
                        tuple(" ".join(rng.choices(words, k=rng.randint(7, 12))) for _ in range(CAPTIONS_PER_CLIP)))
                   for i in range(clips)]
    frames = np.random.default_rng(0).integers(0, 256, (clips, FRAMES, image_size, image_size, 3), dtype=np.uint8)
    return SplitData(annotations, MappedRows(frames), [], entry=f"bench-{clips}-clips")


def epochs(split, data, batch_size: int):
    """``recipe.caption_batches`` epoch after epoch: a 2-clip epoch has only 2 clip batches."""
    from qstudy.train.recipe import caption_batches

    for epoch in itertools.count():
        yield from caption_batches(split, data, batch_size, random.Random(epoch), shard=(0, 1))


def measure(models: Path, cache: Path, name: str, clips: int, steps: int, pair_batch: int) -> dict:
    """Build the method, then time each batching's step in turn; epoch seconds per batching and the prefix build."""
    import torch

    from qstudy.methods import adapter_config_from_mapping
    from qstudy.methods.inject import apply_adapter
    from qstudy.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from qstudy.model.captioner import Captioner
    from qstudy.train.engine import make_engine
    from qstudy.train.recipe import reuse_frozen_prefix, steps_per_epoch

    torch.manual_seed(0)
    model = ModelConfig(vision_encoder=str(models / "vision"), language_model=str(models / "lm"))
    config = RunConfig(data=DataConfig(annotations="-", video_dir="-", num_frames=FRAMES, cache_dir=str(cache)),
                       model=model, adapter=adapter_config_from_mapping(METHODS[name]))
    captioner = Captioner.from_pretrained(model, FRAMES)
    trainable = apply_adapter(captioner, config.adapter)
    split = split_of(clips, captioner.image_size)
    reused = split_of(clips, captioner.image_size)
    started = time.perf_counter()
    reuse_frozen_prefix(captioner, [reused], config, progress=False)
    build_seconds = time.perf_counter() - started
    depth = captioner.prefix_depth
    engine = make_engine(captioner, trainable, TrainConfig(), total_steps=10**6)
    captioner.train()

    variants = {"pairs": (split, DataConfig(annotations="-", video_dir="-", batching="pairs"), pair_batch),
                "clips": (split, DataConfig(annotations="-", video_dir="-"), 1),
                "reuse": (reused, DataConfig(annotations="-", video_dir="-"), 1)}
    batches = {key: epochs(*variant) for key, variant in variants.items()}
    times = {key: [] for key in variants}
    for _ in range(steps + 1):  # the first round warms up
        for key in variants:
            captioner.prefix_depth = depth if key == "reuse" else None
            visual, captions, clip_of_row = next(batches[key])
            step_started = time.perf_counter()
            token_ids, token_mask = captioner.tokenize(captions)
            engine.step(engine.model(visual, token_ids, token_mask, clip_of_row))
            times[key].append(time.perf_counter() - step_started)
    train = {key: TrainConfig(batch_size=batch) for key, (_, _, batch) in variants.items()}
    epoch = {key: statistics.median(times[key][1:]) * steps_per_epoch(rows, data, train[key], world=1)
             for key, (rows, data, _) in variants.items()}
    return {"depth": depth, "layers": captioner.dims.vision_layers, "build_seconds": build_seconds, **epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--pair-batch", type=int, default=2, help="pairs per per-pair batch (P1's batch: 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()

    import torch

    from step_cost import build_models

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_models("paper", Path(tmp) / "models")
        results = {name: measure(Path(tmp) / "models", Path(tmp) / "cache", name, args.clips, args.steps,
                                 args.pair_batch) for name in args.methods}
    print(f"P3 compute: CLIP ViT-B/16 + GPT-2 124M (random weights), {FRAMES} frames, {args.clips} clips x "
          f"{CAPTIONS_PER_CLIP} captions, CPU fp32, {args.threads} thread(s); per-pair batch {args.pair_batch}, "
          f"clip batch 1 clip; median of {args.steps} steps after a warm-up, times the epoch's steps")
    print("| method | layers reused | epoch s, per pair | epoch s, clip-grouped | epoch s, grouped + reuse "
          "| grouped vs pairs | grouped + reuse vs pairs | prefix build s per clip (once) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        reused = f"{r['depth']} of {r['layers']}" if r["depth"] else "none"
        print(f"| {name} | {reused} | {r['pairs']:.1f} | {r['clips']:.1f} | {r['reuse']:.1f} | "
              f"{r['pairs'] / r['clips']:.1f}x | {r['pairs'] / r['reuse']:.1f}x | {r['build_seconds'] / args.clips:.2f} |")


if __name__ == "__main__":
    main()
