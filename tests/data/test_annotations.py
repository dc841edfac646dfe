"""MSR-VTT and MSVD annotation readers on small fixture files in those formats."""

from pathlib import Path

import pytest

from qstudy.core.errors import ConfigError
from qstudy.data.annotations import read_clips

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_msrvtt_reads_split_and_all_captions():
    clips = read_clips("msrvtt", FIXTURES / "msrvtt/annotations.json", FIXTURES / "msrvtt/videos", "train")
    assert [c.video_id for c in clips] == ["video0", "video1"]
    assert clips[0].captions == ("a man is talking about a car", "someone explains an engine")
    assert clips[0].path.name == "video0.mp4"
    assert [c.video_id for c in read_clips("msrvtt", FIXTURES / "msrvtt/annotations.json", ".", "validate")] == ["video2"]


def test_msvd_text_form_with_split_files():
    train = read_clips("msvd", FIXTURES / "msvd/captions.txt", FIXTURES / "msvd", "train")
    assert len(train) == 1 and train[0].video_id == "-4wsuPCjDBc_5_15"
    assert train[0].captions == ("a squirrel is eating a peanut in its shell", "a chipmunk is eating")
    val = read_clips("msvd", FIXTURES / "msvd/captions.txt", FIXTURES / "msvd", "val")  # from val_list.txt
    assert val[0].captions == ("a woman is slicing a tomato",)


def test_msvd_corpus_csv_keeps_english_rows():
    train = read_clips("msvd", FIXTURES / "msvd/corpus.csv", FIXTURES / "msvd", "train")
    assert train[0].captions == ("a squirrel is eating a peanut",)


def test_missing_split_and_missing_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no test.txt or test_list.txt"):
        read_clips("msvd", FIXTURES / "msvd/captions.txt", FIXTURES / "msvd", "test")
    with pytest.raises(ConfigError, match="nope.json not found"):
        read_clips("msrvtt", tmp_path / "nope.json", tmp_path, "train")
    bad = tmp_path / "bad.json"
    bad.write_text('{"videos": []}')
    with pytest.raises(ConfigError, match="bad.json: not an MSR-VTT annotation file"):
        read_clips("msrvtt", bad, tmp_path, "train")
