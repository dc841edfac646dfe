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

from qstudy.methods.inject import apply_adapter, count_parameters
from qstudy.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from qstudy.data.annotations import Clip
from qstudy.data.cache import run_splits, split_frames
from qstudy.metrics import CaptionScorer
from qstudy.model.captioner import Captioner
from qstudy.train.checks import check_loss, check_steps, prepare_output_dir
from qstudy.train.device import autocast, peak_memory_mb, peak_rss_mb, reset_peak_rss, select_device
from qstudy.train.engine import (Engine, join_process_group, make_engine, parameter_bytes, partitioned_build, rank,
                                 whole_parameters, world_size)
from qstudy.train.prefix_cache import prefix_states, reuse_depth

# Epoch e of a run with seed s draws from seed s * SEEDS_PER_RUN + e: runs of neighbouring
# seeds never share an epoch's order or dropout while they train fewer epochs than this.
SEEDS_PER_RUN = 1000

log = logging.getLogger(__name__)


class MappedRows:
    """A split's per-clip rows (uint8 frames, or 16-bit prefix states) as tensors, copied out of a memory map on indexing.

    A run holds one batch at a time, not the split: the map's pages belong to the node's page
    cache, shared by every run on the node. Blind frames are zeros of the batch's shape; the
    split is never read for them. ``view``: the torch dtype of stored 16-bit values.
    """

    def __init__(self, rows: np.ndarray, blind: bool = False, view: torch.dtype | None = None):
        self._source = np.broadcast_to(np.zeros((), rows.dtype), rows.shape) if blind else rows
        self._view = view
        self.shape = rows.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        # One gather into fresh memory, for slices too: a tensor must not alias the read-only map.
        rows = torch.from_numpy(np.take(self._source, np.arange(len(self))[index], axis=0))
        return rows if self._view is None else rows.view(self._view)


@dataclass
class SplitData:
    """A split: the clips that decoded, their frames, and the videos that could not be read."""

    clips: list[Clip]
    frames: MappedRows  # split.frames[indices] -> (len(indices), frames, H, W, 3) uint8 tensor
    skipped: list[dict]
    entry: str = ""  # the frame cache entry the frames come from
    # The clips' states after the frozen prefix, when the run reuses it: what the captioner reads instead.
    states: MappedRows | None = None

    @property
    def visual(self) -> MappedRows:
        """What the captioner's vision side reads for these clips: the prefix states, else the frames."""
        return self.frames if self.states is None else self.states


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
    peak_rss_mb: float | None = None  # this process's peak resident memory so far in the run (Linux)


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
    return SplitData(cached.clips, MappedRows(cached.frames, data.blind), cached.skipped, cached.path.name)


def reuse_frozen_prefix(captioner: Captioner, splits: list[SplitData], config: RunConfig, progress: bool) -> None:
    """Where the method leaves the encoder's first layers frozen, the splits' states after them replace their frames.

    The states come from the node's prefix cache (computed into it by the first run that needs
    them); the captioner then runs only the layers after them. Called before the engine casts
    the model: the prefix is computed in fp32 whatever the run's precision.
    """
    depth, why = reuse_depth(captioner, config)
    log.info("frozen-prefix reuse: %s", why)
    if not depth:
        return
    # Under ZeRO-3 the prefix's layers are shards until the engine runs them: whole for this (a few vision layers).
    prefix_parameters = [p for module in captioner.vision_prefix_modules(depth) for p in module.parameters()]
    with whole_parameters(prefix_parameters):
        for split in splits:
            states, dtype = prefix_states(captioner, split.frames, split.entry, depth, config, progress)
            split.states = MappedRows(states, view=dtype)
    captioner.prefix_depth = depth


def epoch_examples(split: SplitData, data: DataConfig, rng: random.Random | None = None) -> list[tuple[int, tuple]]:
    """One epoch's examples, shuffled by ``rng``: (clip index, its captions) per clip, or one per (clip, caption) pair.

    An epoch visits every clip once with its captions (all of them, or ``captions_per_clip``
    drawn afresh each epoch); ``batching: pairs`` splits each clip into one example per caption.
    How many there are does not depend on ``rng`` (None: unshuffled, each clip's first captions).
    """
    examples = []
    for index, clip in enumerate(split.clips):
        captions = clip.captions
        if data.captions_per_clip is not None and data.captions_per_clip < len(captions):
            captions = tuple(rng.sample(captions, data.captions_per_clip) if rng else captions[:data.captions_per_clip])
        examples += [(index, captions)] if data.batching == "clips" else [(index, (caption,)) for caption in captions]
    if rng is not None:
        rng.shuffle(examples)
    return examples


def caption_batches(split: SplitData, data: DataConfig, batch_size: int, rng: random.Random,
                    num_batches: int | None = None, shard: tuple[int, int] | None = None):
    """One epoch of ``epoch_examples`` in full batches of ``batch_size``: this rank's share of them.

    Yields (vision input, captions, clip_of_row), as ``Captioner.forward`` takes them: with
    clip batches, the batch's clips once each and every caption row's clip; with pairs, one
    vision input per caption (clip_of_row None), as before clips were grouped.
    As ``DistributedSampler(drop_last=True)``: every rank of ``shard = (rank, world)`` (default:
    this process's) yields the same number of batches, ``num_batches`` or as many as the
    examples give every rank, because a rank that steps once more waits forever in an
    all-reduce the others never join. The same ``rng`` state on every rank gives disjoint shares.
    """
    this_rank, world = shard or (rank(), world_size())
    examples = epoch_examples(split, data, rng)
    if num_batches is None:
        num_batches = len(examples) // (world * batch_size)
    share = examples[: num_batches * world * batch_size][this_rank::world]
    for start in range(0, len(share), batch_size):
        chunk = share[start:start + batch_size]
        captions = [caption for _, clip_captions in chunk for caption in clip_captions]
        clip_of_row = None if data.batching == "pairs" else torch.tensor(
            [row for row, (_, clip_captions) in enumerate(chunk) for _ in clip_captions])
        yield split.visual[[index for index, _ in chunk]], captions, clip_of_row


def steps_per_epoch(split: SplitData, data: DataConfig, train: TrainConfig, world: int | None = None) -> int:
    """Optimiser steps in one epoch, the same on every rank of ``world`` (default: this process group's).

    A step takes ``gradient_accumulation_steps`` micro-batches of ``batch_size`` examples
    (``epoch_examples``) from every rank; whole steps only, so no epoch ends (and checkpoints)
    with gradients half accumulated; at most ``max_steps_per_epoch``. ``train_epoch`` asks
    ``caption_batches`` for exactly these.
    """
    examples = len(epoch_examples(split, data))
    steps = examples // ((world or world_size()) * train.batch_size * train.gradient_accumulation_steps)
    return min(steps, train.max_steps_per_epoch or steps)


def seed_epoch(seed: int, epoch: int) -> random.Random:
    """Seed every generator an epoch may draw from by (seed, epoch) alone; returns the one that orders its examples.

    Dropout draws from torch's generators (every CUDA device's too); numpy's and Python's global
    ones are seeded for any library that draws from them. Nothing random carries over from one
    epoch to the next, so a checkpoint needs no generator state: a run resumed after epoch k
    draws in epoch k+1 what the uninterrupted run drew, whatever the process did before.
    """
    epoch_seed = seed * SEEDS_PER_RUN + epoch
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)  # numpy takes 32 bits only
    random.seed(epoch_seed)
    return random.Random(epoch_seed)


def train_epoch(engine: Engine, captioner: Captioner, split: SplitData, config: RunConfig, epoch: int) -> float:
    captioner.train()
    rng = seed_epoch(config.train.seed, epoch)
    micro_batches = steps_per_epoch(split, config.data, config.train) * config.train.gradient_accumulation_steps
    losses = []
    batches = caption_batches(split, config.data, config.train.batch_size, rng, micro_batches)
    for step, (visual, captions, clip_of_row) in enumerate(batches):
        token_ids, token_mask = captioner.tokenize(captions)
        with autocast(captioner.device, config.train.precision):
            loss = engine.model(visual, token_ids, token_mask, clip_of_row)
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
        texts = captioner.generate(split.visual[start:start + len(clips)], config.max_new_tokens, config.num_beams)
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
    # Under ZeRO-3 the towers are built partitioned, and stay so while the run lasts (``partitioned_build``).
    with partitioned_build(config.train):
        return _train_and_evaluate(config, on_epoch, resume_from, progress)


def _train_and_evaluate(config: RunConfig, on_epoch: Callable[[EpochResult, Path], None] | None,
                        resume_from: Path | None, progress: bool) -> RunResult:
    started = time.perf_counter()
    reset_peak_rss()
    output_dir = Path(config.output_dir)
    prepare_output_dir(output_dir)
    torch.manual_seed(config.train.seed)
    join_process_group()  # every rank's share of an epoch, and so the LR schedule, depends on the world size

    # Model: base + adapter; only what the adapter returns trains.
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    trainable = apply_adapter(captioner, config.adapter)
    trainable_params, total_params = count_parameters(captioner)
    held, whole = parameter_bytes(captioner)
    log.info("rank %d holds %.1f MB of the model's %.1f MB of parameters", rank(), held / 2**20, whole / 2**20)
    device = select_device()
    captioner.to(device)

    # Data: decoded once per node into the frame cache, mapped from there for every epoch.
    image_size = config.data.image_size or captioner.image_size
    train_split, val_split = (load_split(config.data, split, image_size, limit, progress)
                              for split, limit in run_splits(config.data))
    reuse_frozen_prefix(captioner, [train_split, val_split], config, progress)

    # The learning-rate schedule spans the whole run, so the engine needs its length.
    train_steps = steps_per_epoch(train_split, config.data, config.train)
    check_steps(train_steps, len(epoch_examples(train_split, config.data)), config.data, config.train)
    engine = make_engine(captioner, trainable, config.train, config.train.epochs * train_steps)

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
                                 train_steps, peak_memory_mb(device), peak_rss_mb())
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
