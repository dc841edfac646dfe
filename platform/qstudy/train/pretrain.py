"""``qstudy base``: pretrain the tiny captioner on the source domain and cache it on disk.

PEFT only means something if the frozen base already speaks the captions' language and sees
the things they name, as a pretrained MLLM does. The tiny base is trained from random
weights on source-domain clips with full fine-tuning; adapters are then studied on the
target domain, whose clips say the same things in a look the encoder has never seen, as
users adapt a pretrained model to MSR-VTT.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from qstudy.methods.inject import apply_adapter
from qstudy.methods.full.config import FullFineTuningConfig
from qstudy.config import DataConfig, ModelConfig, TrainConfig
from qstudy.core.validate import check_at_least
from qstudy.data import synthetic
from qstudy.model.captioner import Captioner
from qstudy.model.tiny import build_tiny
from qstudy.train.checks import check_steps
from qstudy.train.engine import cpu_threads, make_engine
from qstudy.train.recipe import caption_batches, epoch_examples, load_split, steps_per_epoch


@dataclass(frozen=True)
class BaseSpec:
    """Everything the cached base depends on; its hash names the cache directory."""

    source_clips: int = 480
    num_frames: int = 4
    frame_grid: int = 2
    temporal_merger_rank: int = 16
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.3
    seed: int = 0
    # Every result is measured against the base, so a seed must name one base on a machine
    # whatever thread count the caller runs with (the thread count changes the arithmetic).
    # One thread also cannot be oversubscribed: two 2-thread builds on 2 busy cores ran 15x slower.
    threads: int = 1

    def __post_init__(self):
        check_at_least("base", self, source_clips=1, num_frames=1, frame_grid=0, temporal_merger_rank=0, steps=1,
                       batch_size=1, threads=1)


def pretrain_base(base_dir: str | Path, spec: BaseSpec = BaseSpec(), progress: bool = True) -> ModelConfig:
    """Build the tiny base in ``base_dir``, or reuse the one there if it was built from ``spec``."""
    base_dir = Path(base_dir)
    done = base_dir / "base.json"
    if done.exists() and json.loads(done.read_text())["spec"] == asdict(spec):
        return ModelConfig(**json.loads(done.read_text())["model"])
    started = time.perf_counter()
    data_dir = base_dir / "source-data"
    annotations = synthetic.generate(data_dir, synthetic.SyntheticSpec(domain="source", num_clips=spec.source_clips,
                                                                       seed=spec.seed), progress=progress)
    random_init = build_tiny(base_dir / "random-init", synthetic.caption_vocabulary(), seed=spec.seed)

    torch.manual_seed(spec.seed)
    captioner = Captioner.from_pretrained(
        replace(random_init, frame_grid=spec.frame_grid, temporal_merger_rank=spec.temporal_merger_rank), spec.num_frames)
    trainable = apply_adapter(captioner, FullFineTuningConfig())
    train = TrainConfig(batch_size=spec.batch_size, learning_rate=spec.learning_rate, warmup_ratio=spec.warmup_ratio)
    engine = make_engine(captioner, trainable, train, total_steps=spec.steps)
    # Per-pair batches, as the base was built before batches were grouped by clip: a BaseSpec names the same base.
    data = DataConfig(annotations=str(annotations), video_dir=str(data_dir / "videos"), num_frames=spec.num_frames,
                      batching="pairs")
    train_split = load_split(data, "train", captioner.image_size, progress=progress)
    # Else the loop below never ends.
    check_steps(steps_per_epoch(train_split, data, train), len(epoch_examples(train_split, data)), data, train)
    rng = random.Random(spec.seed)

    captioner.train()
    step = 0
    with cpu_threads(spec.threads), tqdm(total=spec.steps, desc="pretraining the tiny base", unit="step",
                                         disable=not progress) as bar:
        while step < spec.steps:
            for frames, captions, _ in caption_batches(train_split, data, spec.batch_size, rng):
                token_ids, token_mask = captioner.tokenize(captions)
                loss = captioner(frames, token_ids, token_mask)
                engine.step(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                step += 1
                if step == spec.steps:
                    break

    model = captioner.save_base(base_dir)
    done.write_text(json.dumps({"model": asdict(model), "spec": asdict(spec),
                                "seconds": time.perf_counter() - started}, indent=2))
    return model
