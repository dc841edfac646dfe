"""The tiny base is a function of its spec: two builds give bit-identical weights, whatever the caller's thread count."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from qstudy.train.pretrain import BaseSpec, pretrain_base

SHORT = BaseSpec(source_clips=48, steps=24, batch_size=16)


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """The build decodes through the frame cache under $QSTUDY_HOME: keep it out of the checkout."""
    monkeypatch.setenv("QSTUDY_HOME", str(tmp_path / "home"))


def _weights(directory: Path) -> dict[str, str]:
    files = [directory / name for name in ("vision/model.safetensors", "lm/model.safetensors", "projector.safetensors")]
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_two_short_builds_give_identical_weights(tmp_path):
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pretrain_base(tmp_path / "a", SHORT, progress=False)
        torch.set_num_threads(1)
        pretrain_base(tmp_path / "b", SHORT, progress=False)
    finally:
        torch.set_num_threads(caller_threads)
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert torch.get_num_threads() == caller_threads  # the build restores the caller's setting


def test_a_built_base_is_reused_and_a_changed_spec_rebuilds(tmp_path, capfd):
    pretrain_base(tmp_path, SHORT)
    bar = capfd.readouterr().err.replace("\r", "\n").splitlines()
    # A progress bar with the step count and an ETA, so a slow build on a busy machine is not silent.
    assert any("pretraining the tiny base: 100%" in line and f"{SHORT.steps}/{SHORT.steps} [" in line and "<" in line
               for line in bar), bar[-3:]
    built = (tmp_path / "base.json").stat().st_mtime_ns
    pretrain_base(tmp_path, SHORT, progress=False)
    assert (tmp_path / "base.json").stat().st_mtime_ns == built
    pretrain_base(tmp_path, BaseSpec(source_clips=48, steps=2, batch_size=16), progress=False)
    assert (tmp_path / "base.json").stat().st_mtime_ns != built
