"""A learnable synthetic video-caption dataset, written as real mp4 files with MSR-VTT or MSVD annotations.

Each clip shows one coloured shape moving in one direction over a noisy background; its
captions are paraphrases naming colour, shape and direction. Two domains share the caption
language but not the visuals: ``source`` (what the tiny base is pretrained on) and
``target`` (outlines on a light background, what adapters are studied on), mirroring a pretrained
captioner adapted to a new dataset. Output is byte-identical for a seed, in any process.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from qstudy.core.errors import ConfigError
from qstudy.core.validate import check_at_least

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
# The target domain keeps the caption language (so the frozen LM can already say every word,
# as a pretrained MLLM can) but shifts what the encoder sees: hollow outlines on a light
# background instead of filled shapes on a dark one. Reading them again is the vision
# encoder's job, which is what an adapter inside it is for.
DOMAINS = {
    "source": {"colours": ("red", "green", "blue"), "shapes": ("circle", "square", "triangle"),
               "background": (0, 60), "outline": False},
    "target": {"colours": ("red", "green", "blue"), "shapes": ("circle", "square", "triangle"),
               "background": (150, 230), "outline": True},
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TEMPLATES = (
    "a {colour} {shape} moves {direction}",
    "the {colour} {shape} is moving {direction}",
    "a {colour} {shape} slides {direction}",
    "a {shape} that is {colour} goes {direction}",
    "there is a {colour} {shape} moving {direction}",
    "the {shape} is {colour} and moves {direction}",
    "a {colour} {shape} travels {direction} across the screen",
)
FPS = 8
SPLITS = {"train": 0.7, "validate": 0.15, "test": 0.15}  # MSR-VTT's split names


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: how many clips of which domain, and their geometry."""

    domain: str = "target"
    num_clips: int = 480
    num_frames: int = 16
    size: int = 32
    captions_per_clip: int = 5
    seed: int = 0

    def __post_init__(self):
        check_at_least("synthetic", self, num_clips=1, num_frames=1, captions_per_clip=1)
        if self.captions_per_clip > len(TEMPLATES):
            raise ConfigError(f"synthetic.captions_per_clip must be <= {len(TEMPLATES)}, got {self.captions_per_clip}")
        if self.domain not in DOMAINS:
            raise ConfigError(f"synthetic.domain: unknown domain {self.domain!r} (one of: {', '.join(DOMAINS)})")


def caption_vocabulary() -> list[str]:
    """Every word any caption of any domain can use (the tiny tokenizer's vocabulary)."""
    words = set()
    for template in TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    for domain in DOMAINS.values():
        words.update(domain["colours"], domain["shapes"])
    words.update(DIRECTIONS)
    return sorted(words)


def all_captions(domain: str) -> list[str]:
    """Every caption the grammar can produce for a domain: the text-only LM corpus."""
    spec = DOMAINS[domain]
    return [t.format(colour=c, shape=s, direction=d)
            for t, c, s, d in itertools.product(TEMPLATES, spec["colours"], spec["shapes"], DIRECTIONS)]


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        # The circle's bounding box: a square of the circle's area differs from it only in a few
        # corner pixels at 32 px, and the base confused the two (shape read at 0.65 on source).
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(colour: str, shape: str, direction: str, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """(frames, size, size, 3) uint8: the shape crossing a noisy background."""
    size, radius = spec.size, spec.size * 0.24
    travel = spec.size * 0.4
    step_x, step_y = DIRECTIONS[direction]
    margin = radius + 1
    # Start so that the whole path stays inside the frame.
    start_x = rng.uniform(margin + travel * max(0, -step_x), size - margin - travel * max(0, step_x))
    start_y = rng.uniform(margin + travel * max(0, -step_y), size - margin - travel * max(0, step_y))
    style = DOMAINS[spec.domain]
    background = rng.integers(*style["background"], size=(size, size, 3))
    frames = np.empty((spec.num_frames, size, size, 3), dtype=np.uint8)
    for t in range(spec.num_frames):
        progress = t / max(1, spec.num_frames - 1)
        centre = (start_x + step_x * travel * progress, start_y + step_y * travel * progress)
        mask = _shape_mask(shape, size, *centre, radius)
        if style["outline"]:
            mask &= ~_shape_mask(shape, size, *centre, radius * 0.5)
        frame = background + rng.integers(-8, 9, size=(size, size, 3))
        frame[mask] = COLOURS[colour]
        frames[t] = np.clip(frame, 0, 255)
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Lossless H.264 (libx264, crf 0, yuv420p) through PyAV: the same frames give the same bytes.

    Lossy rate control is not reproducible in a process that has imported torch (the same
    clips came out byte-different, decoded frames by up to 24 levels, run to run), and then
    neither is anything trained on them. Only chroma subsampling loses detail here.
    """
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@dataclass(frozen=True)
class _Video:
    """One clip: what it shows, its split and its captions."""

    index: int
    colour: str
    shape: str
    direction: str
    split: str
    captions: tuple[str, ...]


def _videos(spec: SyntheticSpec) -> tuple[list[_Video], np.random.Generator]:
    """What each clip shows, its split and captions; and the generator its frames are then drawn from."""
    rng = np.random.default_rng(spec.seed)
    chooser = random.Random(spec.seed)
    domain = DOMAINS[spec.domain]
    combos = list(itertools.product(domain["colours"], domain["shapes"], DIRECTIONS))
    split_names = list(SPLITS)
    split_edges = np.cumsum([SPLITS[s] for s in split_names]) * spec.num_clips
    drawn = []
    for index in range(spec.num_clips):
        colour, shape, direction = combos[index % len(combos)] if index < len(combos) else chooser.choice(combos)
        captions = tuple(template.format(colour=colour, shape=shape, direction=direction)
                         for template in chooser.sample(TEMPLATES, spec.captions_per_clip))
        drawn.append((colour, shape, direction, captions))
    # Shuffle split membership so every split sees every combination.
    order = list(range(spec.num_clips))
    chooser.shuffle(order)
    splits = [split_names[int(np.searchsorted(split_edges, position, side="right"))] for position in order]
    return [_Video(index, *drawn[index][:3], splits[index], drawn[index][3]) for index in range(spec.num_clips)], rng


def _seconds(spec: SyntheticSpec) -> int:
    return -(-spec.num_frames // FPS)


def _msrvtt_files(videos: list[_Video], video_ids: list[str], spec: SyntheticSpec, out_dir: Path,
                  files: dict[str, tuple[str, ...]]) -> None:
    """MSR-VTT's JSON: ``files`` maps each file name to the splits it holds; videos carry MSR-VTT's fields.

    And what each clip shows (colour, shape, direction), which :func:`attribute_accuracy` reads.
    """
    info = {"generator": "qstudy.data.synthetic", **spec.__dict__}
    for name, splits in files.items():
        entries, sentences = [], []
        for video, video_id in zip(videos, video_ids):
            if video.split not in splits:
                continue
            entries.append({"category": DIRECTIONS_CATEGORY[video.direction], "url": f"synthetic://{video_id}",
                            "video_id": video_id, "start time": 0.0, "end time": float(_seconds(spec)),
                            "split": video.split, "id": video.index,
                            "colour": video.colour, "shape": video.shape, "direction": video.direction})
            sentences.extend({"caption": caption, "video_id": video_id, "sen_id": len(sentences)}
                             for caption in video.captions)
        (out_dir / name).write_text(json.dumps({"info": info, "videos": entries, "sentences": sentences}, indent=1))


def _msvd_clip(spec: SyntheticSpec, index: int) -> tuple[str, int, int]:
    """An MSVD clip's (VideoID, Start, End): an 11-character id, as YouTube's, and the clip's seconds."""
    return f"{spec.domain[:3]}{index:08d}", 0, _seconds(spec)


def _msvd_files(videos: list[_Video], video_ids: list[str], spec: SyntheticSpec, out_dir: Path) -> None:
    """MSVD's corpus CSV (English rows only) and one <split>_list.txt per split."""
    with open(out_dir / LAYOUTS["msvd"].annotations, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MSVD_COLUMNS)
        for video in videos:
            for worker, caption in enumerate(video.captions):
                writer.writerow([*_msvd_clip(spec, video.index), worker, "clean", 10, "English", caption])
    for split in SPLITS:
        members = [video_id for video, video_id in zip(videos, video_ids) if video.split == split]
        (out_dir / f"{split}_list.txt").write_text("".join(f"{video_id}\n" for video_id in members))


@dataclass(frozen=True)
class Layout:
    """How a dataset ships: its video ids, the file a config's data.annotations names, and the writer of its files."""

    video_id: Callable[[SyntheticSpec, int], str]
    annotations: str
    write: Callable[[list[_Video], list[str], SyntheticSpec, Path], None]


MSVD_COLUMNS = ("VideoID", "Start", "End", "WorkerID", "Source", "AnnotationTime", "Language", "Description")
DIRECTIONS_CATEGORY = {direction: number for number, direction in enumerate(DIRECTIONS)}
LAYOUTS = {
    # One MSR-VTT-format JSON holding all three splits: what the tiny workspace uses.
    "merged": Layout(lambda spec, index: f"{spec.domain}{index:05d}", "annotations.json",
                     lambda *written: _msrvtt_files(*written, {"annotations.json": tuple(SPLITS)})),
    # MSR-VTT's own files: train and validate in one, test in the other; videos/video<N>.mp4.
    "msrvtt": Layout(lambda spec, index: f"video{index}", "train_val_videodatainfo.json",
                     lambda *written: _msrvtt_files(*written, {"train_val_videodatainfo.json": ("train", "validate"),
                                                               "test_videodatainfo.json": ("test",)})),
    # MSVD's corpus CSV; videos/<VideoID>_<Start>_<End>.mp4.
    "msvd": Layout(lambda spec, index: "_".join(map(str, _msvd_clip(spec, index))), "video_corpus.csv", _msvd_files),
}


def generate(out_dir: str | Path, spec: SyntheticSpec, progress: bool = True, layout: str = "merged") -> Path:
    """Write ``videos/*.mp4`` and the annotations of ``layout`` (see LAYOUTS); return the file data.annotations names.

    The clips, their splits (train, validate, test) and captions are the same in every layout.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: unknown layout {layout!r} (one of: {', '.join(LAYOUTS)})")
    out_dir, chosen = Path(out_dir), LAYOUTS[layout]
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    videos, rng = _videos(spec)
    video_ids = [chosen.video_id(spec, video.index) for video in videos]
    for video, name in tqdm(list(zip(videos, video_ids)), desc=f"writing {spec.domain} clips", disable=not progress):
        write_mp4(out_dir / "videos" / f"{name}.mp4", render_clip(video.colour, video.shape, video.direction, spec, rng))
    chosen.write(videos, video_ids, spec, out_dir)
    return out_dir / chosen.annotations


ATTRIBUTES = ("colour", "shape", "direction")


def attribute_accuracy(predictions: dict[str, str], annotations: str | Path) -> dict[str, float]:
    """Share of clips whose caption names their true colour, shape and direction (and all three).

    On templated captions CIDEr mixes grammar with grounding; these say which attribute a
    model reads from the video and which it guesses.
    """
    truth = {video["video_id"]: video for video in json.loads(Path(annotations).read_text())["videos"]}
    hits = {attribute: 0 for attribute in (*ATTRIBUTES, "all")}
    for video_id, caption in predictions.items():
        words = set(caption.split())
        correct = [truth[video_id][attribute] in words for attribute in ATTRIBUTES]
        for attribute, ok in zip(ATTRIBUTES, correct):
            hits[attribute] += ok
        hits["all"] += all(correct)
    return {attribute: count / max(1, len(predictions)) for attribute, count in hits.items()}
