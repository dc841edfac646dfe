"""Dashboard view files validate into dataclasses, and bad ones fail naming the file and the field."""

from pathlib import Path

import pytest

from qstudy.analysis.views import OPTIONS_BY_VIEW, default_views_dir, load_views
from qstudy.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def test_every_repository_view_file_validates_with_its_options():
    views = load_views(REPO_ROOT / "dashboards")
    assert len(views) == len(list((REPO_ROOT / "dashboards").glob("*.yaml"))) == 4
    for view in views:
        assert isinstance(view.options, OPTIONS_BY_VIEW[view.view])
    assert default_views_dir() == REPO_ROOT / "dashboards"


def test_defaults_fill_what_a_view_leaves_out(tmp_path):
    write(tmp_path, "mine", "view: epoch_curves\ntitle: T\ndescription: D\n")
    (view,) = load_views(tmp_path)
    assert (view.name, view.png.width, view.png.height, view.options.trials) == ("mine", 1100, 650, "front")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("view: pie\ntitle: T\ndescription: D\n", r"view: 'pie' is not one of"),
        ("view: pareto\ntitle: T\n", "missing key description"),
        ("view: pareto\ntitle: T\ndescription: D\ncolour: red\n", "unknown key colour"),
        ("view: pareto\ntitle: T\ndescription: D\noptions: {params_axis: ln}\n", r"options.params_axis: 'ln'"),
        # an option of another view kind is an unknown key here
        ("view: pareto\ntitle: T\ndescription: D\noptions: {trials: all}\n", "unknown key options.trials"),
        ("view: hypervolume\ntitle: T\ndescription: D\npng: {width: 50}\n", r"png.width: 50 is outside"),
    ],
)
def test_bad_view_files_name_the_file_and_the_field(tmp_path, text, message):
    path = write(tmp_path, "bad", text)
    with pytest.raises(ConfigError, match=message) as error:
        load_views(tmp_path)
    assert str(error.value).startswith(str(path))


def test_a_directory_without_views_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no dashboard view files"):
        load_views(tmp_path)
