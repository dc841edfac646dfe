"""Every YAML file in the repository validates against the schema of what reads it.

A new YAML file in a place no reader covers fails this test: give it a validator here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def repo_yaml_files() -> list[Path]:
    """Tracked and new (not ignored) YAML files, as git sees the working tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return sorted(REPO / name for name in listed if (REPO / name).exists())


def validate_run_config(path: Path) -> None:
    from qstudy.config import RunConfig

    RunConfig.from_yaml(path)


def validate_search_space(path: Path) -> None:
    from qstudy.study.space import load_space
    from shapes import paper_dims, tiny_dims

    load_space(path, dims=paper_dims() if path.name == "qadapter.yaml" else tiny_dims())


def validate_dashboard_view(path: Path) -> None:
    from qstudy.analysis.views import parse_view
    from qstudy.core.validate import load_yaml

    parse_view(path.stem, load_yaml(path))


def validate_runtime_env(path: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(path.read_text()))


def validate_cluster_config(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))


def validate_mkdocs_config(path: Path) -> None:
    from mkdocs.config import load_config

    load_config(str(path))


VALIDATORS = {  # glob relative to the repository root -> what reads such a file
    "platform/qstudy/presets/*.yaml": validate_run_config,
    "search_spaces/*.yaml": validate_search_space,
    "dashboards/*.yaml": validate_dashboard_view,
    "jobs/*.yaml": validate_runtime_env,
    "ray_cluster.yaml": validate_cluster_config,
    "mkdocs.yml": validate_mkdocs_config,
}


def validator_for(path: Path):
    relative = path.relative_to(REPO)
    matches = [check for pattern, check in VALIDATORS.items() if relative.match(pattern)]
    assert matches, f"{relative}: no validator knows this YAML file; add one to tests/test_yaml_files.py"
    return matches[0]


@pytest.mark.parametrize("path", repo_yaml_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_yaml_file_validates(path):
    validator_for(path)(path)


def test_every_kind_of_yaml_is_present():
    """Guards the table above against globs that silently match nothing."""
    relatives = [path.relative_to(REPO) for path in repo_yaml_files()]
    for pattern in VALIDATORS:
        assert any(relative.match(pattern) for relative in relatives), f"no file matches {pattern}"
