"""Caption annotation readers: MSR-VTT JSON and MSVD text/CSV, both into a list of clips.

MSR-VTT: ``{"videos": [{"video_id", "split"}...], "sentences": [{"video_id", "caption"}...]}``
with ``<video_dir>/<video_id>.mp4``. MSVD: ``video_id caption`` lines (or the original
corpus CSV, English rows only) with split membership in ``<split>.txt`` or
``<split>_list.txt`` beside the annotation file, one video id per line.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from qstudy.core.errors import ConfigError
from qstudy.core.paths import check_path_component

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mxf")


@dataclass(frozen=True)
class Clip:
    """One video file and its reference captions."""

    video_id: str
    path: Path
    captions: tuple[str, ...]


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


def read_msrvtt(annotations: Path, video_dir: Path, split: str) -> list[Clip]:
    try:
        data = json.loads(annotations.read_text())
        ids = [str(v["video_id"]) for v in data["videos"] if v.get("split", split) == split]
        captions = defaultdict(list)
        for number, sentence in enumerate(data["sentences"]):
            captions[str(sentence["video_id"])].append(
                _caption(sentence["caption"], f"{annotations}: sentences[{number}].caption"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{annotations}: not an MSR-VTT annotation file ({type(error).__name__}: {error})") from None
    return [Clip(i, _video_path(video_dir, i, annotations), tuple(captions[i])) for i in ids if captions[i]]


def _msvd_captions(annotations: Path) -> dict[str, list[str]]:
    captions = defaultdict(list)
    if annotations.suffix == ".csv":
        with annotations.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("Language", "English") == "English" and row.get("Description"):
                    captions[f"{row['VideoID']}_{row['Start']}_{row['End']}"].append(row["Description"].strip())
        return captions
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        video_id, _, caption = line.strip().partition(" ")
        if not caption:
            raise ConfigError(f"{annotations}:{number}: expected 'video_id caption', got {line!r}")
        captions[video_id].append(caption.strip())
    return captions


def read_msvd(annotations: Path, video_dir: Path, split: str) -> list[Clip]:
    if not annotations.exists():
        raise ConfigError(f"{annotations}: file not found")
    captions = _msvd_captions(annotations)
    for name in (f"{split}.txt", f"{split}_list.txt"):
        split_file = annotations.parent / name
        if split_file.exists():
            ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            break
    else:
        raise ConfigError(f"{annotations.parent}: no {split}.txt or {split}_list.txt listing the {split!r} split")
    return [Clip(i, _video_path(video_dir, i, annotations), tuple(captions[i])) for i in ids if captions.get(i)]


READERS = {"msrvtt": read_msrvtt, "msvd": read_msvd}


def read_clips(format: str, annotations: str | Path, video_dir: str | Path, split: str) -> list[Clip]:
    """The clips of one split; an empty split is an error naming the file and split."""
    annotations = Path(annotations)
    if not annotations.exists():
        raise ConfigError(f"data.annotations: {annotations} not found")
    clips = READERS[format](annotations, Path(video_dir), split)
    if not clips:
        raise ConfigError(f"{annotations}: split {split!r} has no captioned videos")
    return clips
