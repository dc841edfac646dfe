"""MSR-VTT and MSVD annotation readers on fixtures laid out as the datasets ship."""

import json
from pathlib import Path

import pytest
import yaml

from qstudy.core.errors import ConfigError
from qstudy.data.annotations import read_clips

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MSRVTT, MSVD = FIXTURES / "msrvtt", FIXTURES / "msvd"
TRAIN_VAL, TEST = MSRVTT / "train_val_videodatainfo.json", MSRVTT / "test_videodatainfo.json"
REPO = Path(__file__).resolve().parents[2]


def ids(clips) -> list[str]:
    return [clip.video_id for clip in clips]


def test_msrvtt_official_files_give_train_validate_and_test_with_every_caption():
    splits = {"train": read_clips("msrvtt", TRAIN_VAL, MSRVTT / "videos", "train"),
              "validate": read_clips("msrvtt", TRAIN_VAL, MSRVTT / "videos", "validate"),
              "test": read_clips("msrvtt", TEST, MSRVTT / "videos", "test")}
    assert {split: ids(clips) for split, clips in splits.items()} == {
        "train": ["video0", "video1", "video2"], "validate": ["video6513", "video6514"], "test": ["video7010", "video7011"]}
    sentences = [s for path in (TRAIN_VAL, TEST) for s in json.loads(path.read_text())["sentences"]]
    for clips in splits.values():  # every sentence of a video, in file order, and nothing else
        for clip in clips:
            assert clip.captions == tuple(s["caption"] for s in sentences if s["video_id"] == clip.video_id)
    assert splits["train"][0].path == MSRVTT / "videos" / "video0.mp4"
    every = [video_id for clips in splits.values() for video_id in ids(clips)]
    assert len(every) == len(set(every))  # no video in two splits


def test_the_paper_space_reads_msrvtt_as_it_ships():
    """search_spaces/qadapter.yaml's split names exist in the official files it names."""
    data = yaml.safe_load((REPO / "search_spaces" / "qadapter.yaml").read_text())["base"]["data"]
    assert Path(data["annotations"]).name == TRAIN_VAL.name and Path(data["test_annotations"]).name == TEST.name
    for field in ("train_split", "val_split"):
        assert read_clips(data["format"], TRAIN_VAL, MSRVTT / "videos", data[field])


def test_a_video_without_a_split_is_an_error_naming_it(tmp_path):
    data = json.loads(TRAIN_VAL.read_text())
    del data["videos"][3]["split"]  # video6513: it joined every split it was asked for
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"{path}: videos\[3\] \(video_id 'video6513'\) has no 'split'"):
        read_clips("msrvtt", path, tmp_path, "train")


def test_an_unknown_split_names_the_file_and_its_splits():
    with pytest.raises(ConfigError, match=rf"no split 'val' in {TRAIN_VAL} \(its splits: train, validate\)"):
        read_clips("msrvtt", TRAIN_VAL, MSRVTT / "videos", "val")


@pytest.mark.parametrize("annotations", ["video_corpus.csv", "AllVideoDescriptions.txt"])
def test_msvd_corpus_csv_and_caption_text_read_alike(annotations):
    """English rows only (a quoted comma kept), '#' lines skipped, splits from <split>_list.txt (not youtube_mapping.txt)."""
    splits = {split: read_clips("msvd", MSVD / annotations, MSVD / "videos", split) for split in ("train", "validate", "test")}
    assert {split: ids(clips) for split, clips in splits.items()} == {
        "train": ["-4wsuPCjDBc_5_15", "-8y1Q0rA3n8_108_115"], "validate": ["-7KMZQEsJW4_205_208"],
        "test": ["-Cv5LsqKUXc_71_75"]}
    assert splits["train"][0].captions == ("a squirrel is eating a peanut in it's shell.", "a chipmunk is eating, quickly")
    assert splits["test"][0].captions == ("a cat jumps onto a table",)
    with pytest.raises(ConfigError, match=r"its splits: test, train, validate\)"):
        read_clips("msvd", MSVD / annotations, MSVD / "videos", "youtube_mapping")


def msvd_corpus(path: Path, videos: int) -> list[str]:
    """A corpus CSV of ``videos`` clips, two English rows each and one German; the rows of clips interleave."""
    video_ids = [(f"yt{number:09d}", number % 60, number % 60 + 9) for number in range(videos)]
    rows = ["VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description"]
    for first, second in zip(video_ids, video_ids[1:] + video_ids[:1]):
        rows += [f"{first[0]},{first[1]},{first[2]},1,clean,10,English,a clip",
                 f"{second[0]},{second[1]},{second[2]},2,clean,10,English,the next clip",
                 f"{first[0]},{first[1]},{first[2]},3,clean,10,German,ein Clip"]
    path.write_text("\n".join(rows) + "\n")
    return ["_".join(map(str, video)) for video in video_ids]


def test_msvd_without_split_files_takes_the_standard_1200_100_670_by_first_appearance(tmp_path):
    order = msvd_corpus(tmp_path / "video_corpus.csv", 1970)
    splits = {split: ids(read_clips("msvd", tmp_path / "video_corpus.csv", tmp_path, split))
              for split in ("train", "validate", "test")}
    assert splits == {"train": order[:1200], "validate": order[1200:1300], "test": order[1300:]}
    assert [len(s) for s in splits.values()] == [1200, 100, 670]


def test_msvd_standard_split_needs_the_whole_corpus(tmp_path):
    msvd_corpus(tmp_path / "video_corpus.csv", 1969)
    with pytest.raises(ConfigError, match="1969 captioned videos and no split files beside it"):
        read_clips("msvd", tmp_path / "video_corpus.csv", tmp_path, "train")
