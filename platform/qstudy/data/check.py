"""The data pre-flight: what would fail every run of a data section, found from its files before any video is decoded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from qstudy.config import DataConfig
from qstudy.core.errors import ConfigError
from qstudy.data.annotations import RUN_SPLITS, clip_limit, read_annotations, split_source


def check_data(data: DataConfig, splits: Iterable[str] = RUN_SPLITS) -> None:
    """Raise a one-line ConfigError naming the dotted field and the file if a run could not read ``splits``.

    ``splits``: fields of ``data`` that name a split (``train_split``, ``val_split``,
    ``test_split``). Errors: an annotation file missing or unreadable, a split name its file
    does not have, a split without captioned videos, a video in two of the splits, the video
    directory missing, or none of a split's videos there. A split of which some videos are
    missing passes: a run skips and counts them. Reads annotations only, decodes nothing.
    """
    video_dir = Path(data.video_dir)
    if not video_dir.is_dir():
        raise ConfigError(f"data.video_dir: {video_dir}: {'not a directory' if video_dir.exists() else 'not found'}")
    files, members = {}, {}
    for name in splits:
        split = getattr(data, name)
        file_field, path = split_source(data, split)
        if path not in files:
            try:
                files[path] = read_annotations(data.format, path)
            except ConfigError as error:
                raise ConfigError(f"{file_field}: {error}") from None
        clips = files[path].clips(split, video_dir, f"data.{name}")
        read = clips[:clip_limit(data, name)]
        if not any(clip.path.exists() for clip in read):
            raise ConfigError(f"data.video_dir: none of the {len(read)} videos of split {split!r} "
                              f"(data.{name}, {path}) is in {video_dir} (first: {clips[0].path.name})")
        for clip in clips:
            other = members.setdefault(clip.video_id, (name, split))
            if other[1] != split:
                raise ConfigError(f"data.{name}: video {clip.video_id!r} of split {split!r} is also in split "
                                  f"{other[1]!r} (data.{other[0]}), {path}")
