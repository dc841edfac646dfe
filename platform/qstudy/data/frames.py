"""Frame sampling with decord: N uniformly spaced frames per clip, resized in the decoder.

A missing or corrupt video is skipped with a warning and counted; it never stops a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from decord import VideoReader, cpu
from decord._ffi.base import DECORDError
from tqdm import tqdm

from qstudy.data.annotations import Clip

log = logging.getLogger(__name__)

# decord raises RuntimeError for a missing or plainly truncated file, but DECORDError (an
# Exception, not a RuntimeError) for a file without a video stream or with broken metadata.
DECODE_ERRORS = (RuntimeError, IndexError, OSError, DECORDError)


def sample_frames(path: str, num_frames: int, size: int) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 RGB, uniformly spaced over the whole clip."""
    # One decoder thread is faster than decord's default for short, small clips.
    reader = VideoReader(str(path), ctx=cpu(0), num_threads=1, width=size, height=size)
    indices = np.linspace(0, len(reader) - 1, num_frames).round().astype(int).tolist()
    return reader.get_batch(indices).asnumpy()


@dataclass
class DecodedClips:
    """The clips that decoded, their frames stacked, and the ones that did not."""

    clips: list[Clip]
    frames: np.ndarray  # (clips, frames, H, W, 3) uint8
    skipped: list[dict] = field(default_factory=list)


def try_sample(clip: Clip, num_frames: int, size: int) -> tuple[np.ndarray | None, dict | None]:
    """``(frames, None)``, or ``(None, skip record)`` for a video that cannot be decoded."""
    try:
        return sample_frames(str(clip.path), num_frames, size), None
    except DECODE_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("skipping video %s: %s", clip.path, message)
        return None, {"video_id": clip.video_id, "path": str(clip.path), "error": message}


def decode_clips(clips: list[Clip], num_frames: int, size: int, progress: bool = True) -> DecodedClips:
    """Decode every clip once, in this process; unreadable ones are logged, counted and left out."""
    kept, frames, skipped = [], [], []
    for clip in tqdm(clips, desc="decoding videos", disable=not progress, leave=False):
        sampled, skip = try_sample(clip, num_frames, size)
        if skip is None:
            frames.append(sampled)
            kept.append(clip)
        else:
            skipped.append(skip)
    stacked = np.stack(frames) if frames else np.zeros((0, num_frames, size, size, 3), np.uint8)
    return DecodedClips(kept, stacked, skipped)
