"""The study-wide frame cache: each split decoded once per node into a memory-mapped file that every run shares.

An entry holds one split's sampled frames for one decode setting. Its key hashes what the
frames came from (the annotation file's bytes, each video's path, size and mtime, decord's
version) and the settings, so an edited video or annotation file is a different entry. An
entry is a directory, ``<key>/frames.u8`` (raw uint8, ``(clips, frames, H, W, 3)``) beside
``<key>/index.json`` (the shape, which clips decoded, which videos were skipped), published
by one atomic rename: readers trust an entry only once its directory exists, so a writer
that dies leaves at most ``<key>.partial``, which the next builder removes. A lock file per
key makes concurrent runs on one node decode each clip once: one builds, the others wait
and then map its result. Imports no torch: the study driver warms the cache before trials.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import decord
import numpy as np
from filelock import FileLock, Timeout
from tqdm import tqdm

from qstudy.core.errors import ConfigError
from qstudy.config import DataConfig, RunConfig
from qstudy.core.paths import qstudy_home
from qstudy.data.annotations import RUN_SPLITS, Clip, clip_limit, data_clips, split_source
from qstudy.data.frames import try_sample
from qstudy.core.dims import read_config, vision_tower_config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the entry layout changes: old entries then simply stop matching
FRAMES_FILE = "frames.u8"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class DecodeSettings:
    """How frames are sampled from a video; every field enters the key and is passed to ``try_sample``."""

    num_frames: int
    size: int
    resize: str

    @classmethod
    def from_data(cls, data: DataConfig, size: int) -> "DecodeSettings":
        # The one place decode settings are read from a config: a field added to this class and
        # here reaches both the cache key and the decoder.
        return cls(num_frames=data.num_frames, size=size, resize=data.resize)


@dataclass
class CachedSplit:
    """One split as a run reads it from the cache."""

    clips: list[Clip]  # the clips that decoded, in annotation order
    frames: np.ndarray  # (clips, frames, H, W, 3) uint8, a read-only memory map of the entry
    skipped: list[dict]  # {video_id, path, error} of the videos that did not decode
    path: Path  # the entry's directory
    decoded: int  # clips this call decoded: 0 when the entry was already there


def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir) if data.cache_dir else qstudy_home() / "cache"


def run_splits(data: DataConfig) -> list[tuple[str, int | None]]:
    """``(split, clip limit)`` of what a run reads: the whole train split, val up to ``max_val_clips``."""
    return [(getattr(data, field), clip_limit(data, field)) for field in RUN_SPLITS]


def _video_signature(path: Path) -> list:
    try:
        stat = path.stat()
    except FileNotFoundError:  # skipped today; a different entry once the file appears
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def cache_key(annotations: Path, clips: list[Clip], settings: DecodeSettings) -> str:
    """What the frames of ``clips`` depend on, hashed; the clip list carries the split and any limit."""
    with open(annotations, "rb") as handle:
        annotations_digest = hashlib.file_digest(handle, "sha256").hexdigest()
    content = {"format": FORMAT_VERSION, "decord": decord.__version__, "annotations": annotations_digest,
               "clips": [[clip.video_id, *_video_signature(clip.path)] for clip in clips],
               "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def _worker_count(requested: int | None, clips: int) -> int:
    """Processes for a cold build: as asked, else every core this process may run on; never more than clips."""
    return max(1, min(requested or len(os.sched_getaffinity(0)), clips))


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _in_order(pool: ProcessPoolExecutor, decode, clips: list[Clip], window: int):
    """``decode(clip)`` for every clip in order, at most ``window`` in flight.

    ``Executor.map`` submits everything at once and results the writer has not reached pile
    up: the building process peaked 121 MB above its start at 800 clips (bench/data_cache.py),
    7 MB with this window.
    """
    pending = collections.deque()
    for clip in clips:
        pending.append(pool.submit(decode, clip))
        if len(pending) == window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_durably(path: Path, chunks: Iterable) -> None:
    """Write ``chunks`` (bytes-like) to ``path`` and fsync it: an entry is published only once its files are on disk."""
    with open(path, "wb") as out:
        for chunk in chunks:
            out.write(memoryview(chunk))
        out.flush()
        os.fsync(out.fileno())


def publish(root: Path, name: str, write: Callable[[Path], None]) -> bool:
    """Make the entry ``root/name`` exist, built by ``write(directory)`` unless a process on this node has; True if built here.

    ``write`` fills a fresh ``<name>.partial`` directory (with :func:`write_durably`) under a
    per-name lock; one rename then publishes it, so a reader never sees half an entry and a
    writer that dies leaves only the partial directory, which the next builder removes.
    """
    root.mkdir(parents=True, exist_ok=True)
    entry = root / name
    if entry.exists():
        return False
    lock = FileLock(str(root / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s; waiting for it", entry)
        lock.acquire()
    try:
        if entry.exists():  # the process we waited for built it
            return False
        partial = entry.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a writer that died: we hold the lock now
        partial.mkdir()
        write(partial)
        _fsync_dir(partial)
        os.rename(partial, entry)
        _fsync_dir(root)
        return True
    finally:
        lock.release()


def _write_frames(partial: Path, clips: list[Clip], settings: DecodeSettings, workers: int, progress: bool) -> None:
    """Decode every clip into ``partial``: the frames file and the index of what decoded."""
    decode = functools.partial(try_sample, **asdict(settings))
    kept, skipped, clip_shape = [], [], None
    # Spawned, not forked: the caller may be a Ray worker or hold torch's threads.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None

    def decoded_frames():
        nonlocal clip_shape
        results = _in_order(pool, decode, clips, window=4 * workers) if pool else map(decode, clips)
        for position, (frames, skip) in enumerate(tqdm(results, total=len(clips), disable=not progress,
                                                       desc=f"decoding {len(clips)} videos ({workers} processes)")):
            if skip is not None:
                skipped.append(skip)
                continue
            if clip_shape is None:
                clip_shape = frames.shape
            elif frames.shape != clip_shape:
                raise RuntimeError(f"{clips[position].path}: decoded to {frames.shape}, other clips to {clip_shape}")
            kept.append(position)
            yield np.ascontiguousarray(frames, np.uint8)

    try:
        write_durably(partial / FRAMES_FILE, decoded_frames())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    shape = [len(kept), *(clip_shape or (settings.num_frames, settings.size, settings.size, 3))]
    index = {"key": partial.name.removesuffix(".partial"), "settings": asdict(settings), "shape": shape,
             "kept": kept, "skipped": skipped}
    write_durably(partial / INDEX_FILE, [json.dumps(index, indent=1).encode()])


def _open(entry: Path, clips: list[Clip], decoded: int) -> CachedSplit:
    index = json.loads((entry / INDEX_FILE).read_text())
    shape = tuple(index["shape"])
    # numpy cannot map an empty file; a split where nothing decoded is an empty array.
    frames = np.memmap(entry / FRAMES_FILE, np.uint8, "r", shape=shape) if shape[0] else np.zeros(shape, np.uint8)
    return CachedSplit([clips[i] for i in index["kept"]], frames, index["skipped"], entry, decoded)


def cached_frames(annotations: Path, clips: list[Clip], settings: DecodeSettings, root: Path,
                  workers: int | None = None, progress: bool = True) -> CachedSplit:
    """The frames of ``clips`` from the cache under ``root``, decoding them first if no process on this node has."""
    key = cache_key(annotations, clips, settings)
    built = publish(root, key, functools.partial(_write_frames, clips=clips, settings=settings,
                                                 workers=_worker_count(workers, len(clips)), progress=progress))
    return _open(root / key, clips, len(clips) if built else 0)


def split_frames(data: DataConfig, split: str, size: int, limit: int | None = None,
                 progress: bool = True) -> CachedSplit:
    """One split of a run's data (its first ``limit`` clips) at ``size`` pixels, through the cache.

    A split of which no video decoded is an error: nothing could train on it or score it.
    """
    clips = data_clips(data, split)[:limit]
    cached = cached_frames(split_source(data, split)[1], clips, DecodeSettings.from_data(data, size), cache_root(data),
                           data.decode_workers, progress)
    if not cached.clips:
        first = cached.skipped[0]
        raise ConfigError(f"data.video_dir {data.video_dir}: none of the {len(clips)} videos of split {split!r} "
                          f"could be decoded (first: {first['path']}: {first['error']})")
    return cached


def prebuild(config: RunConfig, progress: bool = True) -> list[CachedSplit]:
    """Every split a run of ``config`` reads, as ``recipe.run`` will ask for it, without building the model."""
    size = config.data.image_size
    if size is None:  # the encoder's own input size, as the captioner reads it
        try:
            size = vision_tower_config(read_config(config.model.vision_encoder))["image_size"]
        except (OSError, KeyError) as error:
            raise ConfigError(f"model.vision_encoder: cannot read its image size ({error}); "
                              "set data.image_size or prepare the model first") from None
    return [split_frames(config.data, split, size, limit, progress) for split, limit in run_splits(config.data)]
