"""Bad inputs through the CLI as the docs document it: one table, one row per bad input.

Every row runs ``qstudy ...`` in a subprocess and asserts its exit code, that stderr ends in
one ``qstudy`` line naming the field or file and holds no traceback, and that nothing already
produced was lost: no score for a run that trained nothing, files that existed untouched,
nothing written outside the roots, the captions of the good videos printed. Bad videos are
made here with PyAV. Runs that must reach the data or the training loop use a few clips and
steps, with a frame cache of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from qstudy.cli import DEMO_CONFIG

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train.epochs": 1, "train.batch_size": 4, "train.max_steps_per_epoch": 2, "data.max_val_clips": 2,
         "data.decode_workers": 1, "eval.meteor": False, "eval.batch_size": 2, "eval.max_new_tokens": 4}
SPLIT_CLIPS = {"train": 4, "validate": 2}  # the first clips of the workspace's splits make a row's dataset
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: refused at once, whatever network the machine has


# -- bad videos, made with PyAV ---------------------------------------------------------------------

def _encode(path: Path, codec: str, width: int, height: int, frames: int = 8, rate: int = 8,
            container_options: dict | None = None, container_format: str | None = None) -> Path:
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            image = np.full((height, width, 3), index * 25 % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def _faststart(path: Path) -> bytes:
    """An mp4 whose moov atom comes first, as streaming sites serve it: cutting it keeps the index, not the data."""
    return _encode(path, "libx264", 32, 32, frames=64, container_options={"movflags": "faststart"}).read_bytes()


def half_cut_mp4(path: Path) -> None:
    data = _faststart(path)
    path.write_bytes(data[: len(data) // 2])


def garbled_mdat_mp4(path: Path) -> None:
    data = bytearray(_faststart(path))
    start = data.find(b"mdat") + 4
    noise = random.Random(0)
    data[start:] = bytes(noise.randrange(256) for _ in range(len(data) - start))
    path.write_bytes(bytes(data))


def audio_only_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for index in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def header_only_mp4(path: Path) -> None:
    path.write_bytes(_faststart(path)[:100])


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def one_pixel_avi(path: Path) -> None:
    _encode(path, "mpeg4", 1, 1)


def tiny_webm(path: Path) -> None:
    _encode(path, "libvpx", 8, 8)


def mxf(path: Path) -> None:
    _encode(path, "mpeg2video", 32, 32, rate=25, container_format="mxf")


UNDECODABLE = {"half-cut": (half_cut_mp4, ".mp4"), "garbled-mdat": (garbled_mdat_mp4, ".mp4"),
               "audio-only": (audio_only_mp4, ".mp4"), "header-only": (header_only_mp4, ".mp4"),
               "empty": (empty_file, ".mp4")}
# Odd but valid: captioned like any clip (or, where this decord cannot read one, named as not decoded).
ODD_FORMATS = {"1x1-avi": (one_pixel_avi, ".avi"), "8x8-webm": (tiny_webm, ".webm"), "mxf": (mxf, ".mxf")}


# -- the scene a row plays in -------------------------------------------------------------------------

def apply_settings(config: dict, settings: dict) -> None:
    """Set dotted run-config keys (``train.learning_rate``), or whole sections (``adapter``)."""
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if name:
            config.setdefault(section, {})[name] = value
        else:
            config[section] = value


def _digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with a hash of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@dataclass
class Scene:
    """A fresh directory, the session's tiny workspace, and what the row made before running the CLI."""

    workspace: Path
    tmp: Path
    adapter: Path
    mlflow_uri: str
    env: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # {path: digest} that must come out unchanged

    def video(self, make: Callable[[Path], None], suffix: str, name: str) -> Path:
        path = self.tmp / "videos" / f"{name}{suffix}"
        path.parent.mkdir(exist_ok=True)
        make(path)
        return path

    def good_video(self, index: int) -> Path:
        source = sorted((self.workspace / "data" / "target" / "videos").glob("*.mp4"))[index]
        return Path(shutil.copy(source, self.tmp / f"good{index}.mp4"))

    def _annotations(self) -> dict:
        return json.loads((self.workspace / "data" / "target" / "annotations.json").read_text())

    def split_ids(self, split: str) -> list[str]:
        return [v["video_id"] for v in self._annotations()["videos"] if v["split"] == split][:SPLIT_CLIPS[split]]

    def dataset(self, videos: dict[str, Callable[[Path], None]] | None = None,
                edit: Callable[[dict], None] | None = None, msvd: bool = False) -> Path:
        """A few target clips as MSR-VTT (or MSVD) annotations; ``videos`` makes a video id's file instead."""
        source = self._annotations()
        ids = [video_id for split in SPLIT_CLIPS for video_id in self.split_ids(split)]
        root = self.tmp / "data"
        (root / "videos").mkdir(parents=True)
        for video_id in ids:
            if video_id in (videos or {}):
                videos[video_id](root / "videos" / f"{video_id}.mp4")
            else:
                shutil.copy(self.workspace / "data" / "target" / "videos" / f"{video_id}.mp4", root / "videos")
        annotations = {"videos": [v for v in source["videos"] if v["video_id"] in ids],
                       "sentences": [s for s in source["sentences"] if s["video_id"] in ids]}
        if edit is not None:
            edit(annotations)
        if msvd:
            lines = [f"{s['video_id']} {s['caption']}" for s in annotations["sentences"]]
            (root / "captions.txt").write_text("\n".join(lines) + "\n")
            for split in SPLIT_CLIPS:
                (root / f"{split}.txt").write_text(
                    "\n".join(v["video_id"] for v in annotations["videos"] if v["split"] == split) + "\n")
            return root / "captions.txt"
        (root / "annotations.json").write_text(json.dumps(annotations))
        return root / "annotations.json"

    def config(self, overrides: dict | None = None, annotations: Path | None = None, msvd: bool = False) -> Path:
        """The tiny preset, quick, with its own output and cache directories and ``overrides`` (dotted keys)."""
        raw = yaml.safe_load(DEMO_CONFIG.read_text())
        settings = {**QUICK, "data.cache_dir": str(self.tmp / "cache"), **(overrides or {})}
        if annotations is not None:
            settings.update({"data.annotations": str(annotations), "data.video_dir": str(annotations.parent / "videos"),
                             **({"data.format": "msvd"} if msvd else {})})
        apply_settings(raw, settings)
        raw["output_dir"] = str(self.tmp / "run")
        path = self.tmp / "run.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def keep(self, path: Path) -> Path:
        self.kept[path] = _digest(path)
        return path


@dataclass(frozen=True)
class Case:
    """``build(scene)`` makes the inputs and returns the CLI's arguments; ``names``: what the error line says."""

    build: Callable[[Scene], list[str]]
    names: tuple[str, ...]
    code: int = 2
    check: Callable[[Scene, str], None] | None = None  # (scene, stdout): what must have come out anyway
    seconds: float | None = None  # at most this long: a fast error, not a slow one


def no_score(scene: Scene, stdout: str) -> None:
    """A run that trained nothing reports no score and leaves no weights."""
    assert not any((scene.tmp / "run" / name).exists() for name in ("metrics.json", "adapter.safetensors"))
    assert "cider" not in stdout.lower()


def train_case(overrides: dict, *names: str) -> Case:
    """``qstudy train`` on the preset with ``overrides``: refused before anything is built."""
    return Case(lambda scene: ["train", str(scene.config(overrides))], names, 2, no_score)


def data_case(*names: str, videos: dict | None = None, edit=None, overrides: dict | None = None,
              msvd: bool = False) -> Case:
    """``qstudy train`` on a small dataset of the row's making; ``videos``: a split -> the maker of all its files."""

    def build(scene: Scene) -> list[str]:
        makers = {video_id: maker for split, maker in (videos or {}).items() for video_id in scene.split_ids(split)}
        annotations = scene.dataset(videos=makers, edit=edit, msvd=msvd)
        return ["train", str(scene.config(overrides, annotations, msvd))]

    return Case(build, names, 2, no_score)


def _set(annotations: dict, section: str, index: int, key: str, value) -> None:
    annotations[section][index][key] = value


def escaping_id(video_id: str) -> Callable[[dict], None]:
    """Rename the first train video's id in both sections to ``video_id``."""

    def edit(annotations: dict) -> None:
        old = annotations["videos"][0]["video_id"]
        for entry in annotations["videos"] + annotations["sentences"]:
            if entry["video_id"] == old:
                entry["video_id"] = video_id

    return edit


ESCAPING_ID = "../../outside"


def planted_escape(scene: Scene) -> str:
    """A good clip where ``ESCAPING_ID`` points from the dataset's videos: reading it would succeed."""
    shutil.copy(scene.good_video(0), scene.tmp / "outside.mp4")
    return ESCAPING_ID


def id_escape_case(msvd: bool = False) -> Case:
    def build(scene: Scene) -> list[str]:
        annotations = scene.dataset(edit=escaping_id(planted_escape(scene)), msvd=msvd)
        return ["train", str(scene.config(None, annotations, msvd))]

    return Case(build, ("video id", ESCAPING_ID), 2, no_score)


def _space(scene: Scene, study: str) -> Path:
    space = {"study": study, "base": "tiny_qadapter", "trials": 1, "concurrency": 1,
             "arms": {"qadapter": {"adapter.rank": {"choices": [4]}}}}
    path = scene.tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    scene.env["QSTUDY_HOME"] = str(scene.tmp / "home")
    return path


def study_name_case(study: str, via: str) -> Case:
    """``study`` names a directory under ``$QSTUDY_HOME/studies``; ``ROW`` becomes the row's own directory name."""

    def name(scene: Scene) -> str:
        return study.replace("ROW", f"escaped-{scene.tmp.name}")

    def build(scene: Scene) -> list[str]:
        if via == "space":
            return ["study", str(_space(scene, name(scene)))]
        space = _space(scene, "fine")
        return ["study", str(space), "--name", name(scene)] if via == "--name" else ["study", "--resume", name(scene)]

    def check(scene: Scene, stdout: str) -> None:
        assert not (scene.tmp / "home" / "studies" / name(scene)).resolve().exists()
        assert not (scene.tmp / "home" / "studies").exists() or not any((scene.tmp / "home" / "studies").iterdir())

    return Case(build, ("study", "not a plain name"), 2, check)


# -- caption and export --------------------------------------------------------------------------------

def caption_mixed(scene: Scene) -> list[str]:
    """Good clips first and last, between them every bad kind, the odd formats and a missing file."""
    bad = [scene.video(make, suffix, kind) for kind, (make, suffix) in UNDECODABLE.items()]
    odd = [scene.video(make, suffix, name) for name, (make, suffix) in ODD_FORMATS.items()]
    return ["caption", "--adapter", str(scene.adapter), str(scene.good_video(0)), *map(str, bad + odd),
            str(scene.tmp / "videos" / "missing.mp4"), str(scene.good_video(1))]


def every_video_answered(scene: Scene, stdout: str) -> None:
    """A caption for each good clip and each odd format decord reads; each bad one named as not decoded."""
    lines = dict(line.split("\t", 1) for line in stdout.splitlines() if "\t" in line)
    for index in (0, 1):
        assert lines[str(scene.tmp / f"good{index}.mp4")] != "(could not decode this video)"
    for kind, (_, suffix) in UNDECODABLE.items():
        assert lines[str(scene.tmp / "videos" / f"{kind}{suffix}")] == "(could not decode this video)", kind
    assert lines[str(scene.tmp / "videos" / "missing.mp4")] == "(could not decode this video)"
    for name, (_, suffix) in ODD_FORMATS.items():
        assert lines[str(scene.tmp / "videos" / f"{name}{suffix}")].strip(), name


def broken_adapter(change: Callable[[Path], None]) -> Callable[[Scene], list[str]]:
    def build(scene: Scene) -> list[str]:
        adapter = Path(shutil.copytree(scene.adapter, scene.tmp / "adapter"))
        change(adapter)
        scene.keep(adapter)
        return ["caption", "--adapter", str(adapter), str(scene.good_video(0))]

    return build


def truncate_weights(adapter: Path) -> None:
    weights = adapter / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def edit_config(**changes) -> Callable[[Path], None]:
    """Change dotted keys, or whole sections, of the exported config.yaml."""

    def change(adapter: Path) -> None:
        config = yaml.safe_load((adapter / "config.yaml").read_text())
        apply_settings(config, changes)
        (adapter / "config.yaml").write_text(yaml.safe_dump(config))

    return change


def unreachable_hub(scene: Scene) -> list[str]:
    scene.env.update(HF_ENDPOINT=UNREACHABLE_HUB, HF_HUB_OFFLINE="0")
    return broken_adapter(edit_config(**{"model.vision_encoder": "no-such-org/no-such-model"}))(scene)


def export_args(scene: Scene, study: str, out: Path, select: str = "front") -> list[str]:
    return ["export", study, "--mlflow-uri", scene.mlflow_uri, "--select", select, "--out", str(out)]


def export_into_file(scene: Scene) -> list[str]:
    out = scene.tmp / "exported"
    out.write_text("a file the user keeps\n")
    return export_args(scene, "reliability", scene.keep(out))


def export_twice(scene: Scene) -> list[str]:
    out = scene.tmp / "exported"
    first = subprocess.run(cli(*export_args(scene, "reliability", out)), env=subprocess_env(scene), capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    scene.keep(out)
    return export_args(scene, "reliability", out, "best")


def exported_inside_out(scene: Scene, stdout: str) -> None:
    """The trial whose method tag is a path (``/../../../evil``) lands inside --out, under a name of one component."""
    out = scene.tmp / "exported"
    (entry,) = yaml.safe_load((out / "index.yaml").read_text())["trials"]
    assert (out / entry["directory"] / "adapter.safetensors").is_file() and "/" not in entry["directory"]
    assert sorted(path.name for path in scene.tmp.iterdir()) == ["exported"]
    assert not any((parent / "evil-t0").exists() for parent in out.parents[:4])  # where the raw tag would land


def nothing_exported(scene: Scene, stdout: str) -> None:
    assert not (scene.tmp / "exported").exists()


def synthetic_case(clips: int) -> Case:
    def check(scene: Scene, stdout: str) -> None:
        assert not (scene.tmp / "synthetic").exists()

    return Case(lambda scene: ["data", "synthetic", "--out", str(scene.tmp / "synthetic"), "--clips", str(clips)],
                ("num_clips", str(clips)), 2, check)


def base_case(steps: int) -> Case:
    def check(scene: Scene, stdout: str) -> None:
        assert not (scene.tmp / "base").exists()

    return Case(lambda scene: ["base", "--out", str(scene.tmp / "base"), "--steps", str(steps)],
                ("steps", str(steps)), 2, check)


def output_dir_case(below_file: bool) -> Case:
    def build(scene: Scene) -> list[str]:
        taken = scene.tmp / "taken"
        taken.write_text("weights of another run\n")
        scene.keep(taken)
        return ["train", str(scene.config()), "--output-dir", str(taken / "run" if below_file else taken)]

    def check(scene: Scene, stdout: str) -> None:
        assert "epoch 0" not in stdout  # refused before training, not after it

    return Case(build, ("output_dir", "taken"), 2, check)


def cache_case(scene: Scene) -> list[str]:
    return ["data", "cache", str(scene.config(None, scene.dataset(edit=escaping_id(planted_escape(scene)))))]


def cache_val_corrupt(scene: Scene) -> list[str]:
    """``qstudy data cache`` (the study driver's warm-up) on a val split where nothing decodes."""
    annotations = scene.dataset(videos={video_id: header_only_mp4 for video_id in scene.split_ids("validate")})
    return ["data", "cache", str(scene.config(None, annotations))]


def mxf_dataset(scene: Scene) -> list[str]:
    first_train = scene.split_ids("train")[0]

    def replace_with_mxf(annotations: dict) -> None:  # the first train id's only file is an .mxf
        (scene.tmp / "data" / "videos" / f"{first_train}.mp4").unlink()
        mxf(scene.tmp / "data" / "videos" / f"{first_train}.mxf")

    return ["data", "cache", str(scene.config(None, scene.dataset(edit=replace_with_mxf)))]


def mxf_read(scene: Scene, stdout: str) -> None:
    assert f"{SPLIT_CLIPS['train']} clips" in stdout and "0 skipped" in stdout.split("\n")[0], stdout


NAN, INF = float("nan"), float("inf")
TABLE = {
    # Class 2: out-of-range settings fail at the edge, naming the key, before anything is built.
    "lr-nan": train_case({"train.learning_rate": NAN}, "train.learning_rate", "nan"),
    "lr-inf": train_case({"train.learning_rate": INF}, "train.learning_rate", "inf"),
    "warmup-nan": train_case({"train.warmup_ratio": NAN}, "train.warmup_ratio"),
    "weight-decay-negative": train_case({"train.weight_decay": -0.1}, "train.weight_decay", "-0.1"),
    "max-steps-zero": train_case({"train.max_steps_per_epoch": 0}, "train.max_steps_per_epoch"),
    "log-every-zero": train_case({"train.log_every": 0}, "train.log_every"),
    "num-beams-zero": train_case({"eval.num_beams": 0}, "eval.num_beams"),
    "max-new-tokens-zero": train_case({"eval.max_new_tokens": 0}, "eval.max_new_tokens"),
    "eval-batch-zero": train_case({"eval.batch_size": 0}, "eval.batch_size"),
    "max-val-clips-zero": train_case({"data.max_val_clips": 0}, "data.max_val_clips"),
    "image-size-zero": train_case({"data.image_size": 0}, "data.image_size"),
    "caption-tokens-zero": train_case({"model.max_caption_tokens": 0}, "model.max_caption_tokens"),
    "adapter-float-nan": train_case({"adapter": {"method": "lora", "alpha": NAN}}, "adapter.alpha", "nan"),
    # Class 2: runs that would train nothing, or report the score of garbage, are errors naming the cause.
    # One clip per step: the loss of an epoch's first step is taken before any update, so it needs a second.
    "lr-diverges": data_case("train.learning_rate", "loss", overrides={"train.learning_rate": 1e30,
                                                                       "train.batch_size": 1}),
    "batch-larger-than-data": data_case("train.batch_size", "training clips", overrides={"train.batch_size": 21}),
    "accumulation-larger-than-data": data_case("train.batch_size", "gradient_accumulation_steps",
                                               overrides={"train.gradient_accumulation_steps": 6}),
    "train-all-corrupt": data_case("data.video_dir", "'train'", "could be decoded", videos={"train": half_cut_mp4}),
    "train-all-audio-only": data_case("data.video_dir", "'train'", videos={"train": audio_only_mp4}),
    "val-all-missing": data_case("data.video_dir", "'validate'", videos={"validate": lambda path: None}),
    "val-all-garbled": data_case("data.video_dir", "'validate'", videos={"validate": garbled_mdat_mp4}),
    "caption-null": data_case("sentences[0].caption", "None", edit=lambda a: _set(a, "sentences", 0, "caption", None)),
    "caption-empty": data_case("sentences[2].caption", edit=lambda a: _set(a, "sentences", 2, "caption", " ")),
    "caption-number": data_case("sentences[1].caption", "42", edit=lambda a: _set(a, "sentences", 1, "caption", 42)),
    "synthetic-zero-clips": synthetic_case(0),
    "synthetic-negative-clips": synthetic_case(-3),
    "base-negative-steps": base_case(-5),
    "base-zero-steps": base_case(0),
    # Class 3: an output directory that cannot hold the weights fails before training.
    "output-dir-is-a-file": output_dir_case(below_file=False),
    "output-dir-below-a-file": output_dir_case(below_file=True),
    # Class 7: names and ids from files and from MLflow stay inside their roots.
    "video-id-escapes-msrvtt": id_escape_case(),
    "video-id-escapes-msvd": id_escape_case(msvd=True),
    "split-name-escapes": train_case({"data.val_split": "../val"}, "data.val_split", "not a plain name"),
    "video-id-absolute": data_case("video id", "/etc/hostname", edit=escaping_id("/etc/hostname")),
    "video-id-escapes-cache": Case(cache_case, ("video id", ESCAPING_ID)),
    "cache-val-all-corrupt": Case(cache_val_corrupt, ("data.video_dir", "'validate'", "could be decoded")),
    "study-name-escapes-space": study_name_case("../../../ROW", via="space"),
    "study-name-absolute-space": study_name_case("/tmp/ROW", via="space"),
    "study-name-escapes-option": study_name_case("../../../ROW", via="--name"),
    "study-name-escapes-resume": study_name_case("../../../ROW", via="--resume"),
    "export-method-tag-is-a-path": Case(lambda scene: export_args(scene, "evil-tag", scene.tmp / "exported"), (), 0,
                                        exported_inside_out),
    # Class 9: broken exports and adapters are one-line errors; an export never leaves a mismatched index.
    "caption-truncated-weights": Case(broken_adapter(truncate_weights), ("adapter.safetensors",)),
    "caption-weights-shape-mismatch": Case(broken_adapter(edit_config(**{"adapter.rank": 4})),
                                           ("adapter.safetensors", "config.yaml")),
    "caption-weights-of-another-method": Case(broken_adapter(edit_config(adapter={"method": "frozen"})),
                                              ("adapter.safetensors", "frozen")),
    "caption-missing-config": Case(broken_adapter(lambda adapter: (adapter / "config.yaml").unlink()),
                                   ("config.yaml", "not found")),
    "caption-unreachable-hub": Case(unreachable_hub, ("no-such-org/no-such-model", "cannot be reached"),
                                    seconds=20),
    "export-into-a-file": Case(export_into_file, ("--out", "exported", "not a directory")),
    "export-twice-into-one-dir": Case(export_twice, ("--out", "exported", "not empty")),
    "export-front-none-finished": Case(lambda scene: export_args(scene, "all-failed", scene.tmp / "exported"),
                                       ("--select front", "no finished trial"), 2, nothing_exported),
    # Class 1: a corrupt video is skipped and named; what was captioned before and after it is printed.
    "caption-corrupt-odd-and-missing-videos": Case(caption_mixed, ("missing.mp4",), 1, every_video_answered),
    "mxf-is-a-video-extension": Case(mxf_dataset, (), 0, mxf_read),
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qstudy.cli", *args]


def subprocess_env(scene: Scene) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "platform"), "QSTUDY_HOME": str(scene.workspace),
            "OMP_NUM_THREADS": "1", **scene.env}


@pytest.fixture(scope="module")
def adapter(tiny_workspace, tmp_path_factory) -> Path:
    """An exported adapter as `qstudy export` writes one: the preset's config and its (initial) trainable weights."""
    from safetensors.torch import save_file

    from qstudy.methods.inject import apply_adapter
    from qstudy.config import RunConfig
    from qstudy.model.captioner import Captioner
    from qstudy.train.engine import trainable_state

    config = RunConfig.from_yaml(DEMO_CONFIG)
    captioner = Captioner.from_pretrained(config.model, config.data.num_frames)
    apply_adapter(captioner, config.adapter)
    directory = tmp_path_factory.mktemp("adapter")
    save_file(trainable_state(captioner), directory / "adapter.safetensors")
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return directory


@pytest.fixture(scope="module")
def mlflow_uri(adapter, tmp_path_factory) -> str:
    """Three studies as the study engine logs them: one finished trial; a method tag that is a path; all failed."""
    from safetensors import safe_open

    from qstudy.tracking import schema, writer

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = writer.ensure_experiment(uri, "reliability", root / "artifacts")
    with safe_open(str(adapter / "adapter.safetensors"), framework="numpy") as weights:
        trainable = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())
    for study, method, status in [("reliability", "qadapter", schema.FINISHED),
                                  ("evil-tag", "/../../../evil", schema.FINISHED),
                                  ("all-failed", "qadapter", schema.FAILED)]:
        parent = writer.start_study_run(uri, experiment, study, {schema.BASE_TOTAL_PARAM: 10 * trainable})
        target = writer.TrialTarget(uri, experiment, parent, study, str(root / "outbox" / study))
        tracker = writer.TrialTracker(target, "t0", f"{method}-t0")
        tracker.set_tags({schema.METHOD_TAG: method})
        tracker.log_params(schema.trial_params(method, {}, over_budget=False, workers=1, deepspeed=False, zero_stage=0))
        tracker.log_metrics({schema.VAL_CIDER: 0.5, schema.TRAINABLE_PARAMS: trainable,
                             schema.TOTAL_PARAMS: 10 * trainable})
        if status == schema.FINISHED:
            tracker.log_metrics({schema.CIDER: 0.5})
            tracker.log_artifact(adapter / schema.CONFIG_ARTIFACT)
            tracker.log_artifact(adapter / schema.WEIGHTS_ARTIFACT)
        tracker.finish(status)
    return uri


@pytest.mark.parametrize("case", list(TABLE.values()), ids=list(TABLE))
def test_bad_input_fails_in_one_line_and_loses_nothing(case: Case, tiny_workspace, adapter, mlflow_uri, tmp_path):
    scene = Scene(tiny_workspace, tmp_path, adapter, mlflow_uri)
    args = case.build(scene)
    started = time.monotonic()
    done = subprocess.run(cli(*args), env=subprocess_env(scene), capture_output=True, text=True, timeout=300)
    assert case.seconds is None or time.monotonic() - started < case.seconds

    assert done.returncode == case.code, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    if case.code == 2:  # one line per problem (validation reports all it finds); one names the case's cause
        stderr = done.stderr.strip().splitlines()
        assert stderr[-1].startswith("qstudy"), done.stderr
        problems = [line for line in stderr if line.startswith("qstudy")]
        assert any(all(name in line for name in case.names) for line in problems), (case.names, problems)
    else:
        assert all(name in done.stdout + done.stderr for name in case.names), done.stdout + done.stderr
    for path, digest in scene.kept.items():
        assert _digest(path) == digest, f"{path} changed"
    if case.check is not None:
        case.check(scene, done.stdout)
