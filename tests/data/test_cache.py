"""The frame cache: frames identical to direct decoding, keyed by content, built once by concurrent runs, crash-safe.

Small synthetic mp4 sets (a dozen 32 px clips, one corrupt file among them), so each test
takes about a second; concurrent builders and the killed writer are real spawned processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qstudy.config import DataConfig
from qstudy.data import cache
from qstudy.data.annotations import read_clips
from qstudy.data.cache import DecodeSettings, cache_key, cached_frames, split_frames
from qstudy.data.frames import decode_clips
from qstudy.data.synthetic import SyntheticSpec, generate

SETTINGS = DecodeSettings(num_frames=4, size=32, resize="shorter_side_center_crop")
SPAWN = multiprocessing.get_context("spawn")  # as the cache's own pool: no state inherited from pytest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Twelve clips, all in the train split, plus a corrupt mp4 listed among them."""
    out = tmp_path_factory.mktemp("clips")
    annotations = generate(out, SyntheticSpec(num_clips=12, num_frames=8, seed=5), progress=False)
    data = json.loads(annotations.read_text())
    for video in data["videos"]:
        video["split"] = "train"
    data["videos"].insert(3, {"video_id": "broken", "split": "train"})
    data["sentences"].append({"video_id": "broken", "sen_id": -1, "caption": "nothing to see"})
    annotations.write_text(json.dumps(data))
    (out / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return out


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A private copy this test may edit."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def data_config(dataset: Path, cache_dir: Path, **changes) -> DataConfig:
    return DataConfig(annotations=str(dataset / "annotations.json"), video_dir=str(dataset / "videos"),
                      num_frames=SETTINGS.num_frames, cache_dir=str(cache_dir), **changes)


def train_clips(dataset: Path):
    return read_clips("msrvtt", dataset / "annotations.json", dataset / "videos", "train")


def digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


def test_hit_returns_the_frames_and_skips_of_direct_decoding(dataset, tmp_path):
    data = data_config(dataset, tmp_path / "cache", decode_workers=2)  # a process pool against serial decoding
    direct = decode_clips(train_clips(dataset), SETTINGS.num_frames, SETTINGS.size, progress=False)

    built = split_frames(data, "train", SETTINGS.size, progress=False)
    hit = split_frames(data, "train", SETTINGS.size, progress=False)

    assert built.decoded == 13 and hit.decoded == 0 and hit.path == built.path
    assert isinstance(hit.frames, np.memmap) and not hit.frames.flags.writeable
    for split in (built, hit):
        assert np.array_equal(split.frames, direct.frames)
        assert [clip.video_id for clip in split.clips] == [clip.video_id for clip in direct.clips]
        assert split.skipped == direct.skipped
    assert [skip["video_id"] for skip in hit.skipped] == ["broken"]
    assert json.loads((hit.path / cache.INDEX_FILE).read_text())["skipped"] == direct.skipped


def test_limit_and_every_decode_setting_get_their_own_entry(dataset, tmp_path):
    data = data_config(dataset, tmp_path / "cache")
    first = split_frames(data, "train", 32, limit=5, progress=False)
    assert len(first.clips) == 4 and first.skipped[0]["video_id"] == "broken"  # the first five, one broken
    larger = split_frames(data, "train", 40, limit=5, progress=False)
    assert larger.decoded == 5 and larger.frames.shape == (4, 4, 40, 40, 3)
    assert len({first.path, larger.path, split_frames(data, "train", 32, progress=False).path}) == 3


def touch_video(dataset: Path) -> None:
    video = dataset / "videos" / "target00001.mp4"
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def rewrite_video(dataset: Path) -> None:
    shutil.copyfile(dataset / "videos" / "target00007.mp4", dataset / "videos" / "target00001.mp4")


def edit_annotations(dataset: Path) -> None:
    path = dataset / "annotations.json"
    data = json.loads(path.read_text())
    data["sentences"][0]["caption"] += " quickly"
    path.write_text(json.dumps(data))


def repair_broken_video(dataset: Path) -> None:
    shutil.copyfile(dataset / "videos" / "target00002.mp4", dataset / "videos" / "broken.mp4")


@pytest.mark.parametrize("change", [touch_video, rewrite_video, edit_annotations, repair_broken_video],
                         ids=lambda change: change.__name__)
def test_changed_content_is_a_new_entry_with_the_new_frames(dataset, tmp_path, change):
    data = data_config(dataset, tmp_path / "cache")
    before = split_frames(data, "train", SETTINGS.size, progress=False)
    change(dataset)
    after = split_frames(data, "train", SETTINGS.size, progress=False)

    assert after.path != before.path and after.decoded == 13
    direct = decode_clips(train_clips(dataset), SETTINGS.num_frames, SETTINGS.size, progress=False)
    assert np.array_equal(after.frames, direct.frames) and after.skipped == direct.skipped


@pytest.mark.parametrize("other", [replace(SETTINGS, num_frames=8), replace(SETTINGS, size=40),
                                   replace(SETTINGS, resize="squash")], ids=["num_frames", "size", "resize"])
def test_the_key_covers_every_decode_setting(dataset, other):
    clips = train_clips(dataset)
    annotations = dataset / "annotations.json"
    assert cache_key(annotations, clips, SETTINGS) == cache_key(annotations, train_clips(dataset), SETTINGS)
    assert cache_key(annotations, clips, other) != cache_key(annotations, clips, SETTINGS)


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.01)


def counting_build(dataset: Path, root: Path, counter: Path, barrier, results, waiters: int = 0,
                   stall_after: int | None = None) -> None:
    """A builder process: every decode appends the video id to ``counter``.

    Its first decode waits until ``waiters`` other builders have said they wait for its lock
    (each appends a line to ``waiting.txt`` beside ``counter``); after ``stall_after`` decodes it
    stalls until killed, as a writer dying mid-build.
    """
    real = cache.try_sample
    waiting = counter.with_name("waiting.txt")

    class SaysItWaits(logging.Handler):
        def emit(self, record):
            if "waiting for it" in record.getMessage():
                with open(waiting, "a") as handle:
                    handle.write(f"{os.getpid()}\n")

    cache.log.addHandler(SaysItWaits())
    cache.log.setLevel(logging.INFO)
    decodes = 0

    def counted(clip, **settings):
        nonlocal decodes
        if decodes == 0 and waiters:
            wait_for(lambda: waiting.exists() and len(waiting.read_text().split()) >= waiters, "the other builders")
        if decodes == stall_after:
            threading.Event().wait()  # forever: the test kills this process
        with open(counter, "a") as handle:  # O_APPEND: whole lines from every process
            handle.write(clip.video_id + "\n")
        decodes += 1
        return real(clip, **settings)

    cache.try_sample = counted
    clips = train_clips(dataset)
    barrier.wait()
    try:
        split = cached_frames(dataset / "annotations.json", clips, SETTINGS, root, workers=1, progress=False)
        results.put((split.decoded, digest(split.frames), [c.video_id for c in split.clips], split.skipped))
    except Exception as error:  # the test's assertions show it instead of waiting for a result
        results.put((repr(error),))
        raise


def test_concurrent_builders_decode_each_clip_once_and_agree(dataset, tmp_path):
    counter, root, builders = tmp_path / "decodes.txt", tmp_path / "cache", 3
    barrier, results = SPAWN.Barrier(builders), SPAWN.Queue()
    processes = [SPAWN.Process(target=counting_build, args=(dataset, root, counter, barrier, results, builders - 1))
                 for _ in range(builders)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0

    clips = train_clips(dataset)
    assert Counter(counter.read_text().split()) == Counter(clip.video_id for clip in clips)  # each exactly once
    assert sorted(decoded for decoded, *_ in outcomes) == [0, 0, len(clips)]  # one built, two waited and mapped
    assert len((tmp_path / "waiting.txt").read_text().split()) == builders - 1
    direct = decode_clips(clips, SETTINGS.num_frames, SETTINGS.size, progress=False)
    expected = (digest(direct.frames), [clip.video_id for clip in direct.clips], direct.skipped)
    assert all(tuple(outcome[1:]) == expected for outcome in outcomes)


def test_a_killed_writer_leaves_nothing_a_reader_trusts(dataset, tmp_path):
    counter, root = tmp_path / "decodes.txt", tmp_path / "cache"
    barrier, results = SPAWN.Barrier(1), SPAWN.Queue()
    writer = SPAWN.Process(target=counting_build, args=(dataset, root, counter, barrier, results, 0, 3))
    writer.start()
    wait_for(lambda: counter.exists() and len(counter.read_text().split()) == 3 or not writer.is_alive(),
             "three decodes")  # mid-build, frames half written: it stalls at its fourth
    assert writer.is_alive()
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()

    key = cache_key(dataset / "annotations.json", train_clips(dataset), SETTINGS)
    assert (root / f"{key}.partial").exists() and not (root / key).exists()
    rebuilt = cached_frames(dataset / "annotations.json", train_clips(dataset), SETTINGS, root, workers=1,
                            progress=False)  # the dead writer's lock is gone with it: no wait
    assert rebuilt.decoded == 13 and not (root / f"{key}.partial").exists()
    direct = decode_clips(train_clips(dataset), SETTINGS.num_frames, SETTINGS.size, progress=False)
    assert np.array_equal(rebuilt.frames, direct.frames) and rebuilt.skipped == direct.skipped


def test_the_study_driver_side_imports_no_torch():
    """The driver warms the cache before any trial, and the driver never loads torch."""
    code = "import sys, qstudy.data.cache, qstudy.study.tuner\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_qstudy_data_cache_decodes_each_setting_a_space_can_sample_once(tiny_workspace, pristine, tmp_path, capsys):
    """Two arms, frame counts {2, 4} and {4}: two settings x (train, val) entries; a second call only maps them."""
    from qstudy.cli import main

    space = {"study": "cache", "base": "tiny_qadapter", "arms": {
        "qadapter": {"data.num_frames": {"choices": [2, 4]}}, "frozen": {"data.num_frames": 4}},
        "overrides": {"data.annotations": str(pristine / "annotations.json"), "data.video_dir": str(pristine / "videos"),
                      "data.val_split": "train", "data.max_val_clips": 5, "data.cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(space))  # JSON is YAML

    assert main(["data", "cache", str(path), "--workers", "1"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert main(["data", "cache", str(path)]) == 0
    second = capsys.readouterr().out.splitlines()

    assert len(first) == len(second) == 4 and len(list((tmp_path / "cache").glob("*/index.json"))) == 4
    assert sorted(line.split(" frames,")[0] for line in first) == sorted(
        ["qadapter: 12 clips x (2, 32, 32, 3)", "qadapter: 4 clips x (2, 32, 32, 3)",
         "qadapter: 12 clips x (4, 32, 32, 3)", "qadapter: 4 clips x (4, 32, 32, 3)"])
    assert all("1 skipped, decoded" in line for line in first)  # 32 px: the tiny encoder's own size
    assert all("1 skipped, already cached" in line for line in second)
