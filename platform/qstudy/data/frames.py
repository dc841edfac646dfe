"""Frame sampling with decord: N uniformly spaced frames per clip, resized in the decoder.

A missing or corrupt video is skipped with a warning and counted; it never stops a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from decord import VideoReader, cpu
from decord._ffi.base import DECORDError
from tqdm import tqdm

from qstudy.data.annotations import Clip

log = logging.getLogger(__name__)

# decord raises RuntimeError for a missing or plainly truncated file, but DECORDError (an
# Exception, not a RuntimeError) for a file without a video stream or with broken metadata.
DECODE_ERRORS = (RuntimeError, IndexError, OSError, DECORDError)


def sample_frames(path: str, num_frames: int, size: int, resize: str = "shorter_side_center_crop") -> np.ndarray:
    """(num_frames, size, size, 3) uint8 RGB, uniformly spaced over the whole clip.

    ``shorter_side_center_crop`` scales the shorter side to ``size``, keeping the aspect, and
    keeps the centre square, as CLIP's own preprocessing does; ``squash`` scales the whole
    frame to the square, distorting shapes in any frame that is not square.
    """
    width = height = size
    if resize == "shorter_side_center_crop":
        # decord tells a frame's size only by decoding one: the first, once, at native size.
        native_height, native_width = VideoReader(str(path), ctx=cpu(0), num_threads=1).next().shape[:2]
        scale = size / min(native_height, native_width)
        width, height = max(size, round(native_width * scale)), max(size, round(native_height * scale))
    # One decoder thread is faster than decord's default for short, small clips.
    reader = VideoReader(str(path), ctx=cpu(0), num_threads=1, width=width, height=height)
    indices = np.linspace(0, len(reader) - 1, num_frames).round().astype(int).tolist()
    frames = reader.get_batch(indices).asnumpy()
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


@dataclass
class DecodedClips:
    """The clips that decoded, their frames stacked, and the ones that did not."""

    clips: list[Clip]
    frames: np.ndarray  # (clips, frames, H, W, 3) uint8
    skipped: list[dict] = field(default_factory=list)


def sample_or_skip(path: str | Path, num_frames: int, size: int,
                   resize: str = "shorter_side_center_crop") -> tuple[np.ndarray | None, str | None]:
    """``(frames, None)``, or ``(None, why)`` for a video that cannot be decoded.

    The one place a decode failure becomes a skip: training, the frame cache and ``qstudy
    caption`` all read videos through it.
    """
    try:
        return sample_frames(str(path), num_frames, size, resize), None
    except DECODE_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("skipping video %s: %s", path, message)
        return None, message


def try_sample(clip: Clip, num_frames: int, size: int,
               resize: str = "shorter_side_center_crop") -> tuple[np.ndarray | None, dict | None]:
    """``(frames, None)``, or ``(None, skip record)`` for a video that cannot be decoded."""
    frames, error = sample_or_skip(clip.path, num_frames, size, resize)
    return frames, None if error is None else {"video_id": clip.video_id, "path": str(clip.path), "error": error}


def decode_clips(clips: list[Clip], num_frames: int, size: int, progress: bool = True,
                 resize: str = "shorter_side_center_crop") -> DecodedClips:
    """Decode every clip once, in this process; unreadable ones are logged, counted and left out."""
    kept, frames, skipped = [], [], []
    for clip in tqdm(clips, desc="decoding videos", disable=not progress, leave=False):
        sampled, skip = try_sample(clip, num_frames, size, resize)
        if skip is None:
            frames.append(sampled)
            kept.append(clip)
        else:
            skipped.append(skip)
    stacked = np.stack(frames) if frames else np.zeros((0, num_frames, size, size, 3), np.uint8)
    return DecodedClips(kept, stacked, skipped)
