"""The source root must not shadow the standard library's ``platform`` module."""

import platform

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_still_works():
    assert platform.system()  # the stdlib function, not a package named platform
    assert not (REPO / "platform" / "__init__.py").exists()


def test_qstudy_imports_from_the_source_root():
    import qstudy

    assert (REPO / "platform" / "qstudy" / "__init__.py").samefile(qstudy.__file__)
