"""Dashboard view definitions: the YAML files in the repository's ``dashboards/`` validated into :class:`ViewSpec`.

A view file says which figure to draw (``view``), its title and the sentence that tells a
reader what to look for, its PNG size, and the options its figure takes. Each view kind has
its own options dataclass, so a typo or an option of another kind fails here, naming the
file and the field, before any study is read. The figures themselves are drawn by
:mod:`qstudy.analysis.dashboards`. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qstudy.core.errors import ConfigError
from qstudy.core.validate import from_mapping, load_yaml

# Where the views live in a source checkout (editable installs and clones) and, failing that,
# under the working directory, which is where `qstudy report` runs in a clone.
CHECKOUT_VIEWS_DIR = Path(__file__).resolve().parents[3] / "dashboards"


@dataclass(frozen=True)
class ParetoOptions:
    params_axis: Literal["log", "linear"] = "log"  # counts span orders of magnitude: log by default
    # Every point carries its method + config on hover; these also print it beside the point.
    point_labels: Literal["all", "front", "none"] = "front"
    mark_knee: bool = True
    mark_budget: bool = True  # the budget line and the best trial under it, when a budget is given


@dataclass(frozen=True)
class HypervolumeOptions:
    # Divide by the reference box (largest CIDEr x parameter ceiling) so studies read on one scale.
    normalized: bool = False


@dataclass(frozen=True)
class ParallelCoordinatesOptions:
    color_by: Literal["cider", "trainable_params"] = "cider"


@dataclass(frozen=True)
class EpochCurvesOptions:
    trials: Literal["front", "all"] = "front"


OPTIONS_BY_VIEW: dict[str, type] = {
    "pareto": ParetoOptions,
    "hypervolume": HypervolumeOptions,
    "parallel_coordinates": ParallelCoordinatesOptions,
    "epoch_curves": EpochCurvesOptions,
}


@dataclass(frozen=True)
class PngSize:
    width: int = 1100
    height: int = 650

    def __post_init__(self):
        for name in ("width", "height"):
            if not 100 <= getattr(self, name) <= 4000:
                raise ConfigError(f"png.{name}: {getattr(self, name)} is outside 100..4000 pixels")


@dataclass(frozen=True)
class ViewFile:
    """The keys a view file may hold; ``options`` is checked against the view's own dataclass."""

    view: str  # a key of OPTIONS_BY_VIEW
    title: str
    description: str
    png: PngSize = field(default_factory=PngSize)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.view not in OPTIONS_BY_VIEW:
            raise ConfigError(f"view: {self.view!r} is not one of {list(OPTIONS_BY_VIEW)}")


@dataclass(frozen=True)
class ViewSpec:
    """One validated view: its output name (the file's stem) and everything needed to draw it."""

    name: str
    view: str
    title: str
    description: str
    png: PngSize
    options: Any  # the OPTIONS_BY_VIEW dataclass of ``view``


def parse_view(name: str, data: dict) -> ViewSpec:
    spec = from_mapping(ViewFile, data)
    options = from_mapping(OPTIONS_BY_VIEW[spec.view], spec.options, "options")
    return ViewSpec(name=name, view=spec.view, title=spec.title, description=spec.description.strip(),
                    png=spec.png, options=options)


def load_views(directory: str | Path) -> list[ViewSpec]:
    """Every ``*.yaml`` view in ``directory``, by file name; errors name the file and the field."""
    directory = Path(directory)
    paths = sorted(directory.glob("*.yaml"))
    if not paths:
        raise ConfigError(f"{directory}: no dashboard view files (*.yaml)")
    views = []
    for path in paths:
        try:
            views.append(parse_view(path.stem, load_yaml(path)))
        except ConfigError as error:
            message = str(error)
            raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    return views


def default_views_dir() -> Path:
    """The checkout's ``dashboards/``, else ``./dashboards``; a clear error when neither exists."""
    for candidate in (CHECKOUT_VIEWS_DIR, Path.cwd() / "dashboards"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("no dashboards/ directory of view files found next to the qstudy sources or in the "
                      "working directory; pass --views DIR")
