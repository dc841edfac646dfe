"""The data pre-flight: each bad data section is one ConfigError naming the field and the file, before any decoding."""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from qstudy.config import DataConfig
from qstudy.core.errors import ConfigError
from qstudy.data.check import check_data

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ALL_SPLITS = ("train_split", "val_split", "test_split")


def msrvtt(root: Path) -> DataConfig:
    """The official MSR-VTT fixture with an (empty) file for each of its videos: existence is all the check reads."""
    shutil.copytree(FIXTURES / "msrvtt", root)
    (root / "videos").mkdir()
    for path in ("train_val_videodatainfo.json", "test_videodatainfo.json"):
        for video in json.loads((root / path).read_text())["videos"]:
            (root / "videos" / f"{video['video_id']}.mp4").touch()
    return DataConfig(annotations=str(root / "train_val_videodatainfo.json"), video_dir=str(root / "videos"),
                      test_annotations=str(root / "test_videodatainfo.json"))


def msvd(root: Path) -> DataConfig:
    shutil.copytree(FIXTURES / "msvd", root)
    (root / "videos").mkdir()
    for line in (root / "youtube_mapping.txt").read_text().splitlines():
        (root / "videos" / f"{line.split()[0]}.avi").touch()
    return DataConfig(annotations=str(root / "video_corpus.csv"), video_dir=str(root / "videos"), format="msvd")


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[DataConfig], None]:
    def edit(data: DataConfig) -> None:
        path = Path(data.annotations).parent / name
        content = json.loads(path.read_text())
        change(content)
        path.write_text(json.dumps(content))
    return edit


def set_fields(**values) -> Callable[[DataConfig], None]:
    return lambda data: [setattr(data, name, value) for name, value in values.items()]


def remove_videos(*video_ids: str) -> Callable[[DataConfig], None]:
    return lambda data: [path.unlink() for path in Path(data.video_dir).iterdir() if path.stem in video_ids]


@dataclass(frozen=True)
class Bad:
    """``make`` breaks a good data section; the error names each of ``names`` (a file is named relative to the data root)."""

    dataset: Callable[[Path], DataConfig]
    make: Callable[[DataConfig], None]
    names: tuple[str, ...]
    splits: tuple[str, ...] = ALL_SPLITS
    files: tuple[str, ...] = field(default=())


TRAIN_VAL, TEST = "train_val_videodatainfo.json", "test_videodatainfo.json"
CASES = {
    "annotations-missing": Bad(msrvtt, lambda d: Path(d.annotations).unlink(), ("data.annotations", "not found"),
                               files=(TRAIN_VAL,)),
    "annotations-a-directory": Bad(msrvtt, set_fields(annotations="."), ("data.annotations", "not a file")),
    "annotations-not-json": Bad(msrvtt, lambda d: Path(d.annotations).write_text("{videos"),
                                ("data.annotations", "not an MSR-VTT annotation file"), files=(TRAIN_VAL,)),
    "annotations-no-sentences": Bad(msrvtt, edit_json(TRAIN_VAL, lambda a: a.pop("sentences")),
                                    ("data.annotations", "KeyError", "'sentences'"), files=(TRAIN_VAL,)),
    "test-annotations-missing": Bad(msrvtt, lambda d: Path(d.test_annotations).unlink(),
                                    ("data.test_annotations", "not found"), files=(TEST,)),
    "val-split-val": Bad(msrvtt, set_fields(val_split="val"),
                         ("data.val_split", "'val'", "its splits: train, validate"), files=(TRAIN_VAL,)),
    "train-split-unknown": Bad(msrvtt, set_fields(train_split="training"), ("data.train_split", "'training'"),
                               files=(TRAIN_VAL,)),
    "test-split-without-its-file": Bad(msrvtt, set_fields(test_annotations=None),
                                       ("data.test_split", "'test'", "its splits: train, validate"), files=(TRAIN_VAL,)),
    "video-without-split": Bad(msrvtt, edit_json(TRAIN_VAL, lambda a: a["videos"][1].pop("split")),
                               ("data.annotations", "videos[1]", "'video1'", "has no 'split'"), files=(TRAIN_VAL,)),
    "video-listed-twice": Bad(msrvtt, edit_json(TRAIN_VAL, lambda a: a["videos"].append(
        {**a["videos"][0], "split": "validate"})), ("data.annotations", "'video0'", "listed twice"), files=(TRAIN_VAL,)),
    "video-in-both-files": Bad(msrvtt, edit_json(TEST, lambda a: [entry.update(video_id="video1") for entry in (
        a["videos"][0], *(s for s in a["sentences"] if s["video_id"] == a["videos"][0]["video_id"]))]),
                               ("data.test_split", "'video1'", "data.train_split"), files=(TEST,)),
    "split-without-captions": Bad(msrvtt, edit_json(TRAIN_VAL, lambda a: a.update(sentences=[
        s for s in a["sentences"] if not s["video_id"].startswith("video65")])),
        ("data.val_split", "'validate'", "no captioned videos"), files=(TRAIN_VAL,)),
    "video-dir-missing": Bad(msrvtt, set_fields(video_dir="/nonexistent/videos"), ("data.video_dir", "/nonexistent")),
    "no-val-video-there": Bad(msrvtt, remove_videos("video6513", "video6514"),
                              ("data.video_dir", "data.val_split", "'validate'", "video6513.mp4"), files=(TRAIN_VAL,)),
    "no-listed-val-video-there": Bad(msrvtt, lambda d: (set_fields(max_val_clips=1)(d), remove_videos("video6513")(d)),
                                     ("data.video_dir", "data.val_split", "none of the 1 videos")),
    "msvd-val-list-missing": Bad(msvd, lambda d: (Path(d.annotations).parent / "validate_list.txt").unlink(),
                                 ("data.val_split", "'validate'", "its splits: test, train"), files=("video_corpus.csv",)),
    "msvd-video-in-two-lists": Bad(msvd, lambda d: (Path(d.annotations).parent / "test_list.txt").write_text(
        "-4wsuPCjDBc_5_15\n"), ("data.annotations", "'-4wsuPCjDBc_5_15'", "listed twice", "test_list.txt:1",
                                "train_list.txt:1"), files=("video_corpus.csv",)),
    "msvd-no-lists-and-not-the-corpus": Bad(msvd, lambda d: [p.unlink() for p in Path(d.annotations).parent.glob(
        "*_list.txt")], ("data.annotations", "4 captioned videos", "no split files"), files=("video_corpus.csv",)),
    "msvd-csv-without-language": Bad(msvd, lambda d: Path(d.annotations).write_text(
        "VideoID,Start,End,Description\nx,1,2,a clip\n"), ("data.annotations", "not an MSVD annotation file",
                                                             "'Language'"), files=("video_corpus.csv",)),
    "msvd-video-dir-a-file": Bad(msvd, lambda d: set_fields(video_dir=d.annotations)(d),
                                 ("data.video_dir", "not a directory"), files=("video_corpus.csv",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_bad_data_section_is_one_line_naming_field_and_file(case: Bad, tmp_path):
    data = case.dataset(tmp_path / "data")
    check_data(data, case.splits)  # good before the change
    case.make(data)
    with pytest.raises(ConfigError) as raised:
        check_data(data, case.splits)
    message = str(raised.value)
    assert "\n" not in message
    for name in (*case.names, *(str(tmp_path / "data" / file) for file in case.files)):
        assert name in message, (name, message)


def test_missing_videos_of_a_readable_split_are_left_to_the_run(tmp_path):
    data = msrvtt(tmp_path / "data")
    (Path(data.video_dir) / "video0.mp4").unlink()  # one train video: skipped and counted when decoding
    check_data(data)


def test_only_the_splits_asked_for_are_checked(tmp_path):
    data = msrvtt(tmp_path / "data")
    data.test_annotations = None  # a run reads train and validate; the test file is not its business
    check_data(data)
    with pytest.raises(ConfigError, match="data.test_split"):
        check_data(data, ALL_SPLITS)


def test_one_split_serving_twice_is_no_leak(tmp_path):
    data = msrvtt(tmp_path / "data")
    data.val_split = "train"
    check_data(data)
