"""The documentation: the site builds with every page link and anchor resolving, the README's links land.

`mkdocs build --strict` fails on any warning, and mkdocs.yml's ``validation`` turns a link to a
missing page, a missing anchor or a page left out of the nav into one. The README is read on
GitHub, outside the site, so its links are checked here against the repository and the built
pages' anchors.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
# [text](target) and ![alt](target), target up to a space or the closing parenthesis.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def build_site(site_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = build_site(site_dir)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def page_html(site: Path, doc: str) -> Path:
    """The built page of ``docs/<doc>`` (mkdocs' directory URLs: docs/a.md -> a/index.html)."""
    stem = doc.removesuffix(".md")
    return site / ("index.html" if stem == "index" else f"{stem.removesuffix('/index')}/index.html")


def readme_links() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [target for target in MARKDOWN_LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_site_builds_strict_with_every_link_and_anchor_resolving(site):
    assert (site / "index.html").exists()
    for generated in ("reference/cli", "reference/config"):
        assert (site / generated / "index.html").exists(), generated


def test_the_readme_links_into_the_docs_and_every_link_lands(site):
    links = readme_links()
    assert any(link.startswith("docs/") for link in links), "the README should point into docs/"
    broken = []
    for link in links:
        path, _, anchor = unquote(link).partition("#")
        target = REPO / path
        if not target.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and path.startswith("docs/") and path.endswith(".md"):
            html = page_html(site, path.removeprefix("docs/")).read_text()
            if f'id="{anchor}"' not in html:
                broken.append(f"{link}: no heading with anchor #{anchor} on that page")
    assert not broken, "README links that do not land:\n" + "\n".join(broken)


def test_no_page_tells_history():
    """Issue numbers are the tracker's business; the docs say how things are."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    hits = [f"{page.relative_to(REPO)}:{number}: {line.strip()}" for page in pages
            for number, line in enumerate(page.read_text().splitlines(), 1)
            if re.search(r"issue [0-9]+", line, re.IGNORECASE)]
    assert not hits, "\n".join(hits)


def test_the_configuration_reference_lists_every_field_of_every_config(site):
    """The generator reads fields from source; every field the dataclass really has must appear."""
    from qstudy import config
    from qstudy.methods import ADAPTERS
    from qstudy.study.space import SpaceFile

    html = page_html(site, "reference/config.md").read_text()
    sections = {"": [config.RunConfig, SpaceFile], "data.": [config.DataConfig], "model.": [config.ModelConfig],
                "train.": [config.TrainConfig], "eval.": [config.EvalConfig], "adapter.": list(ADAPTERS.values())}
    missing = [f"{prefix}{field.name} ({cls.__name__})" for prefix, classes in sections.items() for cls in classes
               for field in dataclasses.fields(cls) if field.init and not field.name.startswith("_")
               and f"<code>{prefix}{field.name}</code>" not in html]
    assert not missing, missing


def test_the_cli_reference_lists_every_command(site):
    from qstudy.cli import build_parser

    html = page_html(site, "reference/cli.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if f"<code>qstudy {name}" not in html]
    assert not missing, missing
