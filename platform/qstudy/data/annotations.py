"""Caption annotation readers: MSR-VTT JSON and MSVD CSV/text, as their datasets ship them, into splits of clips.

MSR-VTT (Xu et al. 2016): ``{"info", "videos": [{"id", "video_id", "category", "url",
"start time", "end time", "split"}...], "sentences": [{"sen_id", "video_id", "caption"}...]}``.
``train_val_videodatainfo.json`` holds the splits ``train`` (6,513 videos) and ``validate``
(497), ``test_videodatainfo.json`` the split ``test`` (2,990); one file may also hold all
three. Videos are ``<video_dir>/<video_id>.mp4``.

MSVD (Chen & Dolan 2011): the corpus CSV (``VideoID,Start,End,WorkerID,Source,
AnnotationTime,Language,Description``; English rows only) or ``<video_id> <caption>`` lines
(``AllVideoDescriptions.txt``, ``#`` lines are comments), a video id being
``<VideoID>_<Start>_<End>``, as its files are named. Splits are ``<split>.txt`` or
``<split>_list.txt`` beside the annotation file, one video id per line; without any, the
split most MSVD captioning papers use (Venugopalan et al. 2015, "Sequence to Sequence -
Video to Text", and "Translating Videos to Natural Language Using Deep Recurrent Neural
Networks"; Yao et al. 2015): in the order the videos first appear, the first 1,200 train,
the next 100 validate, the last 670 test.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from qstudy.config import DataConfig
from qstudy.core.errors import ConfigError
from qstudy.core.paths import check_path_component

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mxf")
# DataConfig's fields that name a split, in the order an error names the first that matches.
SPLIT_FIELDS = ("train_split", "val_split", "test_split")
RUN_SPLITS = ("train_split", "val_split")  # those a run reads
MSVD_STANDARD_SPLIT = {"train": 1200, "validate": 100, "test": 670}
MSVD_SPLIT_FILES = ("{}.txt", "{}_list.txt")


@dataclass(frozen=True)
class Clip:
    """One video file and its reference captions."""

    video_id: str
    path: Path
    captions: tuple[str, ...]


@dataclass(frozen=True)
class Annotations:
    """One annotation file: each split's video ids in file order, and each video's captions."""

    path: Path
    splits: dict[str, list[str]]
    captions: dict[str, list[str]]

    def clips(self, split: str, video_dir: str | Path, field: str = "split") -> list[Clip]:
        """The captioned clips of ``split``; an unknown or empty split is an error naming ``field`` and the file."""
        if split not in self.splits:
            raise ConfigError(f"{field}: no split {split!r} in {self.path} (its splits: {', '.join(sorted(self.splits))})")
        video_dir = Path(video_dir)
        clips = [Clip(i, _video_path(video_dir, i, self.path), tuple(self.captions[i]))
                 for i in self.splits[split] if self.captions.get(i)]
        if not clips:
            raise ConfigError(f"{field}: split {split!r} of {self.path} has no captioned videos")
        return clips


def _video_path(video_dir: Path, video_id: str, annotations: Path) -> Path:
    check_path_component(video_id, f"{annotations}: video id")  # an id like ../../x would read outside video_dir
    for extension in VIDEO_EXTENSIONS:
        candidate = video_dir / f"{video_id}{extension}"
        if candidate.exists():
            return candidate
    return video_dir / f"{video_id}.mp4"  # missing: the frame reader skips and counts it


def _caption(text, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: expected a non-empty caption string, got {text!r}")
    return text.strip()


def _assign(splits: dict[str, list[str]], video_id: str, split: str, where: dict[str, str], place: str,
            path: Path) -> None:
    """Put a video into a split; a video listed twice is an error, as it could sit in two splits."""
    if video_id in where:
        raise ConfigError(f"{path}: video {video_id!r} is listed twice ({where[video_id]} and {place})")
    where[video_id] = place
    splits[split].append(video_id)


def read_msrvtt(path: Path) -> Annotations:
    splits, where = defaultdict(list), {}
    try:
        data = json.loads(path.read_text())
        for number, video in enumerate(data["videos"]):
            video_id = str(video["video_id"])
            if "split" not in video:  # it would belong to no split, or silently to every one
                raise ConfigError(f"{path}: videos[{number}] (video_id {video_id!r}) has no 'split'")
            _assign(splits, video_id, str(video["split"]), where, f"videos[{number}]", path)
        captions = defaultdict(list)
        for number, sentence in enumerate(data["sentences"]):
            captions[str(sentence["video_id"])].append(
                _caption(sentence["caption"], f"{path}: sentences[{number}].caption"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: not an MSR-VTT annotation file ({type(error).__name__}: {error})") from None
    return Annotations(path, dict(splits), dict(captions))


def _msvd_captions(path: Path) -> dict[str, list[str]]:
    """Each video's English captions, videos in the order they first appear."""
    captions = defaultdict(list)
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["Language"] == "English" and (row["Description"] or "").strip():
                    captions[f"{row['VideoID']}_{row['Start']}_{row['End']}"].append(row["Description"].strip())
        return captions
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        video_id, _, caption = line.strip().partition(" ")
        if not caption.strip():
            raise ConfigError(f"{path}:{number}: expected 'video_id caption', got {line!r}")
        captions[video_id].append(caption.strip())
    return captions


def _msvd_split_files(path: Path) -> dict[str, Path]:
    """The split files beside an MSVD annotation file, by split name."""
    files = {file.name.removesuffix("_list.txt"): file for file in path.parent.glob("*_list.txt")}
    # Any other .txt (the captions themselves, youtube_mapping.txt) is a split only under a split's usual name.
    for split in ("train", "val", "validate", "test"):
        file = path.parent / MSVD_SPLIT_FILES[0].format(split)
        if file.exists() and file != path:
            files.setdefault(split, file)
    return files


def read_msvd(path: Path) -> Annotations:
    try:
        captions = _msvd_captions(path)
        files = _msvd_split_files(path)
        splits, where = defaultdict(list), {}
        for split, file in sorted(files.items()):
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    _assign(splits, line.strip(), split, where, f"{file.name}:{number}", path)
    except (OSError, UnicodeDecodeError, KeyError, csv.Error) as error:
        raise ConfigError(f"{path}: not an MSVD annotation file ({type(error).__name__}: {error})") from None
    if files:
        return Annotations(path, {split: splits[split] for split in files}, dict(captions))
    standard = sum(MSVD_STANDARD_SPLIT.values())
    if len(captions) != standard:
        raise ConfigError(f"{path}: {len(captions)} captioned videos and no split files beside it "
                          f"(<split>.txt or <split>_list.txt); MSVD's standard split needs its {standard}")
    order, edges, start = list(captions), {}, 0
    for split, size in MSVD_STANDARD_SPLIT.items():
        edges[split], start = order[start:start + size], start + size
    return Annotations(path, edges, dict(captions))


READERS = {"msrvtt": read_msrvtt, "msvd": read_msvd}


def read_annotations(format: str, path: str | Path) -> Annotations:
    """Every split of one annotation file; a missing or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'not a file' if path.exists() else 'not found'}")
    return READERS[format](path)


def read_clips(format: str, annotations: str | Path, video_dir: str | Path, split: str,
               field: str = "split") -> list[Clip]:
    """The clips of one split of one annotation file; errors about the split name ``field``."""
    return read_annotations(format, annotations).clips(split, video_dir, field)


def split_field(data: DataConfig, split: str) -> str:
    """The dotted field of ``data`` that names ``split``, for errors (``split`` if none does)."""
    return next((f"data.{name}" for name in SPLIT_FIELDS if getattr(data, name) == split), "split")


def clip_limit(data: DataConfig, field: str) -> int | None:
    """How many of a split's first clips a run reads: all, and up to data.max_val_clips of the val split."""
    return data.max_val_clips if field == "val_split" else None


def split_source(data: DataConfig, split: str) -> tuple[str, Path]:
    """The field and file ``split`` is read from: data.test_annotations for data.test_split when set, else data.annotations."""
    if split == data.test_split and data.test_annotations:
        return "data.test_annotations", Path(data.test_annotations)
    return "data.annotations", Path(data.annotations)


def data_clips(data: DataConfig, split: str) -> list[Clip]:
    """The clips of ``split`` as ``data`` places it."""
    field, path = split_source(data, split)
    try:
        annotations = read_annotations(data.format, path)
    except ConfigError as error:
        raise ConfigError(f"{field}: {error}") from None
    return annotations.clips(split, data.video_dir, split_field(data, split))
