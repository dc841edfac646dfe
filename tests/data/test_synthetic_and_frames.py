"""Synthetic mp4 clips decoded by decord; unreadable videos are skipped and counted."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from qstudy.data.annotations import Clip, read_clips
from qstudy.data.frames import decode_clips, sample_frames
from qstudy.data.synthetic import COLOURS, SyntheticSpec, generate, render_clip, write_mp4

RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate(out, SyntheticSpec(domain="target", num_clips=40, seed=3), progress=False)


def test_generates_real_mp4_and_msrvtt_annotations(dataset):
    out, annotations = dataset
    data = json.loads(annotations.read_text())
    assert len(data["videos"]) == 40 and len(data["sentences"]) == 40 * 5
    assert {v["split"] for v in data["videos"]} == {"train", "validate", "test"}
    assert (out / "videos" / "target00000.mp4").read_bytes()[4:8] == b"ftyp"  # an ISO-BMFF (mp4) file
    clips = read_clips("msrvtt", annotations, out / "videos", "train")
    assert len(clips) == 28
    truth = {v["video_id"]: v for v in data["videos"]}
    for clip in clips:  # every reference names what the clip shows
        words = [set(caption.split()) for caption in clip.captions]
        assert all({truth[clip.video_id][a] for a in ("colour", "shape", "direction")} <= w for w in words)


@pytest.mark.parametrize(("layout", "files", "format"), [
    ("msrvtt", {"train_val_videodatainfo.json": ("train", "validate"), "test_videodatainfo.json": ("test",)}, "msrvtt"),
    ("msvd", {"video_corpus.csv": ("train", "validate", "test")}, "msvd"),
])
def test_cli_writes_each_official_layout_and_the_readers_read_it_back(layout, files, format, dataset, tmp_path):
    """``qstudy data synthetic --layout``: the clips, splits and captions of the default layout, renamed as the dataset names them."""
    from qstudy.cli import main
    from qstudy.data.annotations import read_annotations
    from qstudy.data.frames import sample_frames

    assert main(["data", "synthetic", "--out", str(tmp_path), "--clips", "40", "--seed", "3", "--layout", layout]) == 0
    merged_dir, merged = dataset
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt") == sorted([*files, "videos"])
    merged_splits = read_annotations("msrvtt", merged)
    seen = []
    for name, splits in files.items():
        annotations = read_annotations(format, tmp_path / name)
        assert sorted(annotations.splits) == sorted(splits)
        for split in splits:
            clips = annotations.clips(split, tmp_path / "videos")
            expected = merged_splits.clips(split, merged_dir / "videos")
            assert [c.captions for c in clips] == [c.captions for c in expected]
            assert all(c.path.exists() and c.path.suffix == ".mp4" for c in clips)
            seen += [c.video_id for c in clips]
    assert len(seen) == len(set(seen)) == 40  # every clip in exactly one split
    if layout == "msrvtt":
        assert all(video_id.startswith("video") for video_id in seen)
        video = json.loads((tmp_path / "train_val_videodatainfo.json").read_text())["videos"][0]
        assert {"video_id", "category", "url", "start time", "end time", "split", "id"} <= set(video)
    else:  # <VideoID>_<Start>_<End>, an 11-character VideoID
        assert all(len(video_id.rsplit("_", 2)[0]) == 11 for video_id in seen)
    first = sorted((tmp_path / "videos").iterdir())[0]
    assert first.read_bytes()[4:8] == b"ftyp" and sample_frames(str(first), num_frames=4, size=32).shape == (4, 32, 32, 3)


def _digests(directory) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def test_two_generations_give_identical_bytes_and_frames(tmp_path):
    """Byte for byte, in a process that has loaded torch (where lossy libx264 was not reproducible)."""
    import torch  # noqa: F401  (the condition under which lossy encoding varied run to run)

    first = generate(tmp_path / "a", SyntheticSpec(num_clips=40, seed=7), progress=False)
    second = generate(tmp_path / "b", SyntheticSpec(num_clips=40, seed=7), progress=False)
    assert first.read_text().replace(str(tmp_path / "a"), "") == second.read_text().replace(str(tmp_path / "b"), "")
    assert _digests(tmp_path / "a" / "videos") == _digests(tmp_path / "b" / "videos")
    clips = {name: read_clips("msrvtt", tmp_path / name / "annotations.json", tmp_path / name / "videos", "train")
             for name in ("a", "b")}
    frames = [decode_clips(clips[name], num_frames=4, size=32, progress=False).frames for name in ("a", "b")]
    assert np.array_equal(*frames)


def test_decord_frames_keep_the_drawn_colour_and_motion(tmp_path):
    spec = SyntheticSpec(num_frames=16)
    frames = render_clip("blue", "square", "right", spec, np.random.default_rng(0))
    write_mp4(tmp_path / "clip.mp4", frames)
    decoded = sample_frames(str(tmp_path / "clip.mp4"), num_frames=8, size=32)
    assert decoded.shape == (8, 32, 32, 3) and decoded.dtype == np.uint8
    blue = np.array(COLOURS["blue"])
    centres = []
    for frame in decoded:
        mask = np.abs(frame.astype(int) - blue).sum(-1) < 60
        assert mask.sum() > 10  # the shape survives H.264 with its colour
        centres.append(np.argwhere(mask)[:, 1].mean())
    assert all(b > a for a, b in zip(centres, centres[1:]))  # and it moves right


def test_corrupt_and_missing_videos_are_skipped_and_counted(dataset, tmp_path):
    out, annotations = dataset
    clips = read_clips("msrvtt", annotations, out / "videos", "validate")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    extra = [Clip("corrupt", corrupt, ("x",)), Clip("missing", tmp_path / "missing.mp4", ("x",))]
    decoded = decode_clips(clips + extra, num_frames=4, size=32, progress=False)
    assert len(decoded.clips) == len(clips) and decoded.frames.shape == (len(clips), 4, 32, 32, 3)
    assert [s["video_id"] for s in decoded.skipped] == ["corrupt", "missing"]
    assert all(s["error"] for s in decoded.skipped)


@pytest.fixture(scope="module")
def wide_clip(tmp_path_factory) -> Path:
    """A 128x64 clip: red left quarter, blue centre half, green right quarter."""
    from qstudy.data.synthetic import write_mp4

    frame = np.zeros((64, 128, 3), np.uint8)
    frame[:, :32], frame[:, 32:96], frame[:, 96:] = RED, BLUE, GREEN
    path = tmp_path_factory.mktemp("wide") / "wide.mp4"
    write_mp4(path, np.stack([frame] * 4))
    return path


def nearest(pixels: np.ndarray) -> list[str]:
    """The name of the nearest of red, blue and green for each pixel of a row."""
    names, colours = ["red", "blue", "green"], np.array([RED, BLUE, GREEN])
    return [names[i] for i in np.abs(pixels[:, None].astype(int) - colours).sum(-1).argmin(-1)]


@pytest.mark.parametrize(("resize", "left", "middle", "right"), [
    ("shorter_side_center_crop", "blue", "blue", "blue"),  # the centre square, at its own aspect
    ("squash", "red", "blue", "green"),  # everything, squeezed
])
def test_resize_keeps_the_centre_or_squashes_everything(wide_clip, resize, left, middle, right):
    # Not 16 px: decord 0.6 garbles widths of 16 and 48 px (rows padded to 64 bytes), in either mode.
    frames = sample_frames(str(wide_clip), num_frames=2, size=32, resize=resize)
    assert frames.shape == (2, 32, 32, 3)
    # Columns clear of the colour edges, which H.264 and scaling blur by a pixel or two.
    assert nearest(frames[0, 16, [3, 16, 28]]) == [left, middle, right]
