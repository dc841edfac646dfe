"""One fine-tuning run, top to bottom: config in, build, train, evaluate every epoch, report.

``run(config)`` is a plain function: ``qstudy train`` calls it in-process, Ray Train workers
call it under torch.distributed, and the study engine passes ``on_epoch`` to report metrics
and checkpoints. Nothing here knows about Ray, Tune or MLflow.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from qstudy.adapters import apply_adapter, count_parameters
from qstudy.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from qstudy.data.annotations import Clip
from qstudy.data.cache import run_splits, split_frames
from qstudy.metrics import CaptionScorer
from qstudy.model.captioner import Captioner
from qstudy.train.checks import check_loss, check_steps, prepare_output_dir
from qstudy.train.device import autocast, peak_memory_mb, select_device
from qstudy.train.engine import Engine, make_engine, rank, world_size

log = logging.getLogger(__name__)


class SplitFrames:
    """A split's frames as batches of uint8 tensors, copied out of the cache's memory map on indexing.

    A run holds one batch of frames at a time, not the split: the map's pages belong to the
    node's page cache, shared by every run on the node. Blind frames are zeros of the batch's
    shape; the split is never read for them.
    """

    def __init__(self, frames: np.ndarray, blind: bool = False):
        self._source = np.broadcast_to(np.zeros((), np.uint8), frames.shape) if blind else frames
        self.shape = frames.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        # One gather into fresh memory, for slices too: a tensor must not alias the read-only map.
        return torch.from_numpy(np.take(self._source, np.arange(len(self))[index], axis=0))


@dataclass
class SplitData:
    """A split: the clips that decoded, their frames, and the videos that could not be read."""

    clips: list[Clip]
    frames: SplitFrames  # split.frames[indices] -> (len(indices), frames, H, W, 3) uint8 tensor
    skipped: list[dict]


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val: dict[str, float]
    seconds: float
    examples: dict[str, str] = field(default_factory=dict)
    # The training part of ``seconds`` and its optimiser steps: step time and throughput, without eval.
    train_seconds: float = 0.0
    train_steps: int = 0
    peak_memory_mb: float | None = None  # the accelerator's peak allocated so far in the run; None on CPU


@dataclass
class RunResult:
    """What a run produced; ``metrics.json`` is this, serialised."""

    method: str
    trainable_params: int
    total_params: int
    epochs: list[EpochResult]
    skipped_videos: list[dict]
    wall_seconds: float
    output_dir: str

    @property
    def final(self) -> dict[str, float]:
        return self.epochs[-1].val if self.epochs else {}

    def to_dict(self) -> dict:
        return {**asdict(self), "final": self.final, "num_skipped_videos": len(self.skipped_videos)}


def load_split(data: DataConfig, split: str, image_size: int, limit: int | None = None, progress: bool = True) -> SplitData:
    """A split from the node's frame cache (decoded into it first if no run has yet)."""
    cached = split_frames(data, split, image_size, limit, progress)
    return SplitData(cached.clips, SplitFrames(cached.frames, data.blind), cached.skipped)


def caption_batches(split: SplitData, batch_size: int, rng: random.Random, num_batches: int | None = None,
                    shard: tuple[int, int] | None = None):
    """One epoch of shuffled (clip, reference caption) pairs in full batches: this rank's share of them.

    As ``DistributedSampler(drop_last=True)``: every rank of ``shard = (rank, world)`` (default:
    this process's) yields the same number of batches, ``num_batches`` or as many as the pairs
    give every rank, because a rank that steps once more waits forever in an all-reduce the
    others never join. The same ``rng`` state on every rank gives disjoint shares.
    """
    this_rank, world = shard or (rank(), world_size())
    pairs = [(i, caption) for i, clip in enumerate(split.clips) for caption in clip.captions]
    rng.shuffle(pairs)
    if num_batches is None:
        num_batches = len(pairs) // (world * batch_size)
    share = pairs[: num_batches * world * batch_size][this_rank::world]
    for start in range(0, len(share), batch_size):
        chunk = share[start:start + batch_size]
        yield split.frames[[i for i, _ in chunk]], [caption for _, caption in chunk]


def steps_per_epoch(split: SplitData, train: TrainConfig, world: int | None = None) -> int:
    """Optimiser steps in one epoch, the same on every rank of ``world`` (default: this process group's).

    A step takes ``gradient_accumulation_steps`` micro-batches from every rank; whole steps
    only, so no epoch ends (and checkpoints) with gradients half accumulated; at most
    ``max_steps_per_epoch``. ``train_epoch`` asks ``caption_batches`` for exactly these.
    """
    pairs = sum(len(clip.captions) for clip in split.clips)
    steps = pairs // ((world or world_size()) * train.batch_size * train.gradient_accumulation_steps)
    return min(steps, train.max_steps_per_epoch or steps)


def train_epoch(engine: Engine, captioner: Captioner, split: SplitData, config: RunConfig, epoch: int) -> float:
    captioner.train()
    rng = random.Random(config.train.seed * 1000 + epoch)
    micro_batches = steps_per_epoch(split, config.train) * config.train.gradient_accumulation_steps
    losses = []
    for step, (frames, captions) in enumerate(caption_batches(split, config.train.batch_size, rng, micro_batches)):
        token_ids, token_mask = captioner.tokenize(captions)
        with autocast(captioner.device, config.train.precision):
            loss = engine.model(frames, token_ids, token_mask)
        engine.step(loss)
        losses.append(loss.item())
        if step % config.train.log_every == 0:
            log.info("epoch %d step %d loss %.4f", epoch, step, loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def predict(captioner: Captioner, split: SplitData, config: EvalConfig) -> dict[str, str]:
    """``{video_id: caption}`` for every clip of the split."""
    captioner.eval()
    predictions = {}
    for start in range(0, len(split.clips), config.batch_size):
        clips = split.clips[start:start + config.batch_size]
        texts = captioner.generate(split.frames[start:start + len(clips)], config.max_new_tokens, config.num_beams)
        predictions.update({clip.video_id: text for clip, text in zip(clips, texts)})
    return predictions


def evaluate(captioner: Captioner, split: SplitData, scorer: CaptionScorer, config: EvalConfig) -> tuple[dict, dict]:
    """Caption every val clip and score against its references.

    Every rank decodes the whole split: ZeRO-3 gathers weights inside forward, so ranks must
    run identical generate loops; only rank 0's scores are used.
    """
    predictions = predict(captioner, split, config)
    references = {clip.video_id: list(clip.captions) for clip in split.clips}
    examples = {clip.video_id: predictions[clip.video_id] for clip in split.clips[:3]}
    return scorer.score(predictions, references), examples


def run(config: RunConfig, on_epoch: Callable[[EpochResult, Path], None] | None = None,
        resume_from: Path | None = None, progress: bool = True) -> RunResult:
    """Train and evaluate one config; ``on_epoch(result, checkpoint_dir)`` after every epoch."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    prepare_output_dir(output_dir)
    torch.manual_seed(config.train.seed)

    # Model: base + adapter; only what the adapter returns trains.
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    trainable = apply_adapter(captioner, config.adapter)
    trainable_params, total_params = count_parameters(captioner)
    device = select_device()
    captioner.to(device)

    # Data: decoded once per node into the frame cache, mapped from there for every epoch.
    image_size = config.data.image_size or captioner.image_size
    train_split, val_split = (load_split(config.data, split, image_size, limit, progress)
                              for split, limit in run_splits(config.data))

    # The learning-rate schedule spans the whole run, so the engine needs its length.
    steps = steps_per_epoch(train_split, config.train)
    check_steps(steps, train_split.clips, config.train)
    engine = make_engine(captioner, trainable, config.train, config.train.epochs * steps)

    start_epoch = 0
    if resume_from is not None:
        start_epoch = engine.load(resume_from)["epoch"] + 1
    epochs: list[EpochResult] = []
    with CaptionScorer(meteor=config.eval.meteor) as scorer:
        for epoch in range(start_epoch, config.train.epochs):
            epoch_started = time.perf_counter()
            loss = train_epoch(engine, captioner, train_split, config, epoch)  # loss.item() syncs every step
            check_loss(loss, epoch, config.train)
            train_seconds = time.perf_counter() - epoch_started
            with autocast(device, config.train.precision):
                val, examples = evaluate(captioner, val_split, scorer, config.eval)
            result = EpochResult(epoch, loss, val, time.perf_counter() - epoch_started, examples, train_seconds,
                                 steps_per_epoch(train_split, config.train), peak_memory_mb(device))
            epochs.append(result)
            log.info("epoch %d: loss %.4f %s", epoch, loss, " ".join(f"{k} {v:.3f}" for k, v in val.items()))
            if on_epoch is not None:
                with tempfile.TemporaryDirectory() as checkpoint:
                    engine.save(Path(checkpoint), {"epoch": epoch})
                    on_epoch(result, Path(checkpoint))

    result = RunResult(
        method=config.adapter.method,
        trainable_params=trainable_params,
        total_params=total_params,
        epochs=epochs,
        skipped_videos=train_split.skipped + val_split.skipped,
        wall_seconds=time.perf_counter() - started,
        output_dir=str(output_dir),
    )
    adapter_weights = engine.trainable_state()
    if rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_file(adapter_weights, output_dir / "adapter.safetensors")
        (output_dir / "metrics.json").write_text(json.dumps({"config": config.to_dict(), **result.to_dict()}, indent=2))
    return result
