"""A learnable synthetic video-caption dataset, written as real mp4 files with MSR-VTT annotations.

Each clip shows one coloured shape moving in one direction over a noisy background; its
captions are paraphrases naming colour, shape and direction. Two domains share the caption
language but not the visuals: ``source`` (what the tiny base is pretrained on) and
``target`` (outlines on a light background, what adapters are studied on), mirroring a pretrained
captioner adapted to a new dataset. Output is byte-identical for a seed, in any process.
"""

from __future__ import annotations

import itertools
import json
import random
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
SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}


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


def write_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> None:
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


def generate(out_dir: str | Path, spec: SyntheticSpec, progress: bool = True) -> Path:
    """Write ``videos/*.mp4`` and ``annotations.json`` (MSR-VTT format); return the JSON path."""
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    chooser = random.Random(spec.seed)
    domain = DOMAINS[spec.domain]
    combos = list(itertools.product(domain["colours"], domain["shapes"], DIRECTIONS))
    videos, sentences = [], []
    split_names = list(SPLITS)
    split_edges = np.cumsum([SPLITS[s] for s in split_names]) * spec.num_clips
    for index in tqdm(range(spec.num_clips), desc=f"writing {spec.domain} clips", disable=not progress):
        colour, shape, direction = combos[index % len(combos)] if index < len(combos) else chooser.choice(combos)
        video_id = f"{spec.domain}{index:05d}"
        write_mp4(out_dir / "videos" / f"{video_id}.mp4", render_clip(colour, shape, direction, spec, rng))
        split = split_names[int(np.searchsorted(split_edges, index, side="right"))]
        videos.append({"video_id": video_id, "split": split, "colour": colour, "shape": shape, "direction": direction})
        for template in chooser.sample(TEMPLATES, spec.captions_per_clip):
            sentences.append({"video_id": video_id, "sen_id": len(sentences),
                              "caption": template.format(colour=colour, shape=shape, direction=direction)})
    # Shuffle split membership so every split sees every combination.
    order = list(range(spec.num_clips))
    chooser.shuffle(order)
    assigned = [videos[i]["split"] for i in range(spec.num_clips)]
    for video, position in zip(videos, order):
        video["split"] = assigned[position]
    annotations = out_dir / "annotations.json"
    annotations.write_text(json.dumps({"info": {"generator": "qstudy.data.synthetic", **spec.__dict__},
                                       "videos": videos, "sentences": sentences}, indent=1))
    return annotations


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
