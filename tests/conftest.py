"""Shared fixtures: a session-wide tiny workspace (synthetic mp4 clips + pretrained tiny base)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """QSTUDY_HOME with target-domain clips and the cached tiny base, built once per session.

    Reuses ``$QSTUDY_TEST_CACHE`` across sessions when set (local runs); CI builds it fresh.
    """
    from qstudy.cli import prepare_tiny_workspace

    home = Path(os.environ.get("QSTUDY_TEST_CACHE") or tmp_path_factory.mktemp("qstudy_home"))
    prepare_tiny_workspace(home)
    os.environ["QSTUDY_HOME"] = str(home)
    return home
