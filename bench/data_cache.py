"""P3 data: a trial's data preparation from the study-wide frame cache, cold and warm, against decoding per trial.

Usage:
    python bench/data_cache.py                    # 200 and 800 MSR-VTT-like clips, 8 frames at 224 px
    python bench/data_cache.py --clips 200        # one size only

Clips are MSR-VTT-like: 320x240, 30 fps, 15 s, H.264 (PyAV + libx264 at its defaults), a
panning textured scene with moving shapes and sensor noise, so that inter frames cost what
real footage costs to decode. They are generated once under ``--dir`` (default
``$QSTUDY_HOME/bench/msrvtt-like``) and reused by later runs. Only ``--distinct`` (200) clips
are encoded (encoding 800 x 15 s clips takes several minutes on this 2-core machine);
each set of N clips hard-links them under N distinct ids. Decoding cost and bytes are per
clip, and the cache keys every path separately, so every id is decoded and stored.

Every measurement runs in a fresh subprocess that first imports torch and the recipe, as
a trial has them; "data MB" is that process's peak RSS (VmHWM) after the imports minus its
RSS before the measured step, i.e. what data preparation added:

- decode per trial: today's path (``decode_clips`` on one core, the split stacked in RAM);
- cache cold: ``recipe.load_split`` on an empty cache (decodes on every core, writes the entry);
- cache warm: ``recipe.load_split`` again (maps the entry);
- epoch: every clip once in shuffled batches of 32 out of the warm cache, with the entry in
  the page cache and again after evicting it (``posix_fadvise``), against decoding every
  clip per epoch, which is what decode per trial costs each epoch if frames are not kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from step_cost import _rss_mb

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 30, 15
NUM_FRAMES, SIZE, BATCH = 8, 224, 32


def render(seed: int):
    """(450, 240, 320, 3) uint8: a textured scene panning under two moving shapes, with noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = FPS * SECONDS
    coarse = rng.integers(0, 256, (HEIGHT // 8 + 8, WIDTH // 8 + 24, 3), dtype=np.uint8)
    texture = np.kron(coarse, np.ones((8, 8, 1), np.uint8))  # blocky scene, wider than the frame: it pans
    noise = rng.integers(-6, 7, (8, HEIGHT, WIDTH, 3), dtype=np.int16)
    video = np.empty((frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(frames):
        shift = t * (texture.shape[1] - WIDTH) // frames
        frame = texture[:HEIGHT, shift:shift + WIDTH].astype(np.int16) + noise[t % len(noise)]
        for speed, colour in ((2, (230, 40, 40)), (-3, (40, 90, 230))):
            x = (40 + speed * t) % (WIDTH - 60)
            y = (60 + abs(speed) * t // 3) % (HEIGHT - 60)
            frame[y:y + 50, x:x + 60] = colour
        video[t] = np.clip(frame, 0, 255)
    return video


def encode(path: Path, seed: int) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in render(seed):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def prepare(directory: Path, distinct: int, sizes: list[int]) -> None:
    """Encode the distinct clips once; each N-clip set hard-links them under N ids, all in split "train"."""
    source = directory / "distinct"
    source.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(distinct) if not (source / f"{i:05d}.mp4").exists()]
    if missing:
        print(f"encoding {len(missing)} clips of {SECONDS} s into {source} (once)", flush=True)
        started = time.perf_counter()
        with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
            list(pool.map(encode, [source / f"{i:05d}.partial.mp4" for i in missing], missing))
        for i in missing:
            os.replace(source / f"{i:05d}.partial.mp4", source / f"{i:05d}.mp4")
        print(f"encoded in {time.perf_counter() - started:.0f} s", flush=True)
    for size in sizes:
        videos = directory / f"set-{size}" / "videos"
        videos.mkdir(parents=True, exist_ok=True)
        ids = [f"clip{i:05d}" for i in range(size)]
        for i, video_id in enumerate(ids):
            if not (videos / f"{video_id}.mp4").exists():
                os.link(source / f"{i % distinct:05d}.mp4", videos / f"{video_id}.mp4")
        (directory / f"set-{size}" / "annotations.json").write_text(json.dumps({
            "videos": [{"video_id": i, "split": "train"} for i in ids],
            "sentences": [{"video_id": i, "caption": "a scene pans under two moving boxes"} for i in ids]}))


def measure(mode: str, dataset: Path, cache_dir: Path) -> dict:
    """Runs inside the subprocess: one measurement of one mode, after the imports a trial has."""
    import torch  # noqa: F401 - a trial has it loaded: its RSS is not the data's

    from qstudy.config import DataConfig
    from qstudy.data.annotations import read_clips
    from qstudy.data.frames import decode_clips
    from qstudy.train.recipe import load_split

    data = DataConfig(annotations=str(dataset / "annotations.json"), video_dir=str(dataset / "videos"),
                      num_frames=NUM_FRAMES, cache_dir=str(cache_dir))
    if mode.startswith("epoch"):
        split = load_split(data, "train", SIZE, progress=False)
        if mode == "epoch-evicted":
            for frames_file in cache_dir.glob("*/frames.u8"):
                descriptor = os.open(frames_file, os.O_RDONLY)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(descriptor)
    before, anon_before = _rss_mb("VmRSS"), _rss_mb("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak below is this step's own
    started = time.perf_counter()
    if mode == "decode":
        decoded = decode_clips(read_clips("msrvtt", data.annotations, data.video_dir, "train"), NUM_FRAMES, SIZE,
                               progress=False)
        frames = torch.from_numpy(decoded.frames)  # what load_split kept for the whole run before the cache
        clips = len(frames)
    elif mode in ("cold", "warm"):
        clips = len(load_split(data, "train", SIZE, progress=False).clips)
    else:
        order = list(range(len(split.clips)))
        random.Random(0).shuffle(order)
        for start in range(0, len(order), BATCH):
            batch = split.frames[order[start:start + BATCH]]
            assert batch.shape[1:] == (NUM_FRAMES, SIZE, SIZE, 3)
        clips = len(order)
    seconds = time.perf_counter() - started
    return {"mode": mode, "clips": clips, "seconds": seconds, "data_mb": _rss_mb() - before, "peak_mb": _rss_mb(),
            "anon_mb": _rss_mb("RssAnon") - anon_before}


def run(mode: str, dataset: Path, cache_dir: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--worker", mode, str(dataset), str(cache_dir)],
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", type=int, default=[200, 800])
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="default: $QSTUDY_HOME/bench/msrvtt-like")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "DATASET", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))))
        return

    from qstudy.core.paths import qstudy_home

    directory = args.dir or qstudy_home() / "bench" / "msrvtt-like"
    prepare(directory, args.distinct, args.clips)
    results = {}
    for size in args.clips:
        dataset, cache_dir = directory / f"set-{size}", directory / f"cache-{size}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        results[size] = {mode: run(mode, dataset, cache_dir)
                         for mode in ("decode", "cold", "warm", "epoch", "epoch-evicted")}
        print(f"{size} clips: " + ", ".join(f"{mode} {r['seconds']:.2f} s" for mode, r in results[size].items()),
              flush=True)

    print(f"\n{NUM_FRAMES} frames at {SIZE} px from {WIDTH}x{HEIGHT} {FPS} fps {SECONDS} s H.264 clips; "
          f"{len(os.sched_getaffinity(0))} cores; data MB = peak RSS of the step minus RSS before it")
    print("| clips | decode per trial s (ms/clip) | cache cold s | cache warm s | warm vs per trial | "
          "data MB per trial / cold / warm | epoch from cache s (evicted) | epoch decoding s | epoch ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, r in results.items():
        decode, cold, warm, epoch, evicted = (r[m] for m in ("decode", "cold", "warm", "epoch", "epoch-evicted"))
        print(f"| {size} | {decode['seconds']:.1f} ({1000 * decode['seconds'] / size:.0f}) | {cold['seconds']:.1f} | "
              f"{warm['seconds']:.3f} | {decode['seconds'] / warm['seconds']:.0f}x | "
              f"{decode['data_mb']:.0f} / {cold['data_mb']:.0f} / {warm['data_mb']:.1f} | "
              f"{epoch['seconds']:.2f} ({evicted['seconds']:.2f}) | {decode['seconds']:.1f} | "
              f"{decode['seconds'] / epoch['seconds']:.0f}x ({decode['seconds'] / evicted['seconds']:.0f}x) |")
    if len(results) > 1:
        small, large = min(results), max(results)
        for mode in ("decode", "warm"):
            print(f"{mode}: data MB at {large} clips / at {small} clips = "
                  f"{results[large][mode]['data_mb']:.1f} / {results[small][mode]['data_mb']:.1f}")
        epoch = results[large]["epoch"]
        print(f"epoch over {large} clips from the cache: data MB {epoch['data_mb']:.0f}, of which private (anonymous) "
              f"{epoch['anon_mb']:.0f} MB at the end; the rest is the entry's pages, shared by every run on the node")


if __name__ == "__main__":
    main()
