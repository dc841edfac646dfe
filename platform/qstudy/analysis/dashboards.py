"""Draws the views defined in ``dashboards/*.yaml`` from a study's analysis, as offline HTML and PNG.

Four view kinds (``dashboards/README.md`` describes each): the Pareto scatter, the
hypervolume history, parallel coordinates of the hyperparameters, and the per-epoch CIDEr
curves. A view file picks the kind, its title, description and options
(:mod:`qstudy.analysis.views`); this module turns a :class:`StudyAnalysis` into the figure.
Each view is written as a standalone HTML page with plotly.js inlined, so it opens with no
network (and inside the MLflow UI's artifact viewer), and as a PNG rendered by kaleido in
headless Chromium. This module imports no torch.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from qstudy.analysis.pareto import StudyAnalysis
from qstudy.analysis.views import (
    EpochCurvesOptions,
    HypervolumeOptions,
    ParallelCoordinatesOptions,
    ParetoOptions,
    ViewSpec,
)
from qstudy.records import TrialRecord
from qstudy.tracking.schema import STOPPED

_TEMPLATE = "plotly_white"
_TRIAL_HOVER = "%{customdata[1]}<br>val CIDEr %{y:.4f}<br>%{x:,} trainable params<extra>trial %{customdata[0]}</extra>"


def _trial_markers(
    trials: Sequence[TrialRecord], name: str, marker: dict, printed_labels: Sequence[str] = ()
) -> go.Scatter:
    """A marker per trial, hover showing its label; ``printed_labels`` also print beside the points."""
    return go.Scatter(
        x=[record.trainable_params for record in trials],
        y=[record.cider for record in trials],
        mode="markers+text" if any(printed_labels) else "markers",
        name=name,
        text=list(printed_labels) if any(printed_labels) else None,
        # Above the point: the front's steps leave it to the right and arrive from below.
        textposition="top center",
        cliponaxis=False,
        textfont={"size": 10},
        customdata=[[record.trial_id, record.label] for record in trials],
        hovertemplate=_TRIAL_HOVER,
        marker=marker,
    )


def pareto_figure(analysis: StudyAnalysis, options: ParetoOptions) -> tuple[go.Figure, str]:
    """CIDEr against trainable parameters, one trace per method, the front as a step line."""
    valid = analysis.valid
    labelled = {"all": valid, "front": analysis.front, "none": ()}[options.point_labels]
    figure = go.Figure()
    for method in sorted({record.method for record in valid}):
        trials = [record for record in valid if record.method == method]
        # The legend already names the method: beside the point, the config is enough.
        printed = [(record.config or record.method) if record in labelled else "" for record in trials]
        figure.add_trace(_trial_markers(trials, method, {"size": 10, "opacity": 0.85}, printed))
    # "hv" steps right then up: between two front points, the region a cheaper trial already
    # dominates ends where the next, larger trial starts to beat it.
    figure.add_trace(
        go.Scatter(
            x=[record.trainable_params for record in analysis.front],
            y=[record.cider for record in analysis.front],
            mode="lines",
            line={"shape": "hv", "color": "black", "dash": "dot"},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    if options.mark_knee and analysis.knee is not None:
        knee_marker = {"symbol": "star", "size": 20, "color": "gold", "line": {"color": "black", "width": 1}}
        # Legend names stay short (the MLflow UI shows the page in a narrow pane); hover has the config.
        figure.add_trace(_trial_markers([analysis.knee], f"knee (trial {analysis.knee.trial_id})", knee_marker))
    if options.mark_budget and analysis.budget is not None and valid:
        ciders = [record.cider for record in valid]
        # A line trace rather than a layout shape: shapes on log axes take log10 positions.
        figure.add_trace(
            go.Scatter(
                x=[analysis.budget, analysis.budget],
                y=[min(ciders), max(ciders)],
                mode="lines",
                line={"color": "firebrick", "dash": "dash"},
                name=f"budget {analysis.budget:,}",
                hoverinfo="skip",
            )
        )
        if analysis.best_under_budget is not None:
            ring = {"symbol": "circle-open", "size": 22, "color": "firebrick", "line": {"width": 2}}
            figure.add_trace(
                _trial_markers([analysis.best_under_budget],
                               f"best under budget (trial {analysis.best_under_budget.trial_id})", ring)
            )
    figure.update_layout(
        xaxis={"title": {"text": f"trainable parameters ({options.params_axis} scale)"}, "type": options.params_axis},
        yaxis={"title": {"text": "val CIDEr"}},
        legend={"title": {"text": "method"}},
    )
    stopped = sum(record.status == STOPPED for record in analysis.records)
    # A stopped trial has only a low-fidelity CIDEr: counted here, never drawn on the plane.
    return figure, (f"{len(valid)} trials, {len(analysis.front)} on the Pareto front"
                    + (f"; {stopped} stopped early by the scheduler, not shown" if stopped else ""))


def hypervolume_figure(analysis: StudyAnalysis, options: HypervolumeOptions) -> tuple[go.Figure, str]:
    """The dominated hypervolume after each trial: flat stretches are trials that improved nothing."""
    scale = analysis.ideal_box if options.normalized and analysis.ideal_box > 0 else 1.0
    figure = go.Figure(
        go.Scatter(
            x=[order for order, _ in analysis.history],
            y=[volume / scale for _, volume in analysis.history],
            mode="lines+markers",
            line={"shape": "hv"},
            name="hypervolume",
            hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>",
        )
    )
    unit = "fraction of the reference box" if scale != 1.0 else "CIDEr x trainable params"
    figure.update_layout(
        xaxis={"title": {"text": "trial (completion order)"}},
        yaxis={"title": {"text": f"hypervolume ({unit})"}},
    )
    cider_floor, params_ceiling = analysis.reference
    return figure, f"reference CIDEr {cider_floor:g}, {params_ceiling:,.0f} params"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _category_label(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ",".join(_category_label(item) for item in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _category_order(value: Any) -> tuple[int, float, str]:
    # numbers in numeric order (so rank 8 sits below 16), then text alphabetically, missing last
    if value is None:
        return (2, 0.0, "")
    if _is_number(value):
        return (0, float(value), "")
    return (1, 0.0, _category_label(value))


def _dimension(name: str, values: list[Any]) -> dict[str, Any]:
    """One parcoords axis: numbers as they are, anything else as integer codes with tick labels."""
    if all(_is_number(value) for value in values):
        return {"label": name, "values": values}
    example_of = {}
    for value in values:
        example_of.setdefault(_category_label(value), value)
    categories = sorted(example_of, key=lambda label: _category_order(example_of[label]))
    code_of = {label: code for code, label in enumerate(categories)}
    return {
        "label": name,
        "values": [code_of[_category_label(value)] for value in values],
        "tickvals": list(range(len(categories))),
        "ticktext": categories,
    }


def parallel_coordinates_figure(
    analysis: StudyAnalysis, options: ParallelCoordinatesOptions
) -> tuple[go.Figure, str]:
    """One line per valid trial across its hyperparameters, then its size and CIDEr.

    A hyperparameter some methods lack (LoRA's alpha for a Q-Adapter trial) reads "n/a" on a
    categorical axis rather than dropping the trial's line. Axes are named by the key's last
    part (``adapter.rank`` -> ``rank``), as in the trial labels.
    """
    valid = analysis.valid
    param_names = list(dict.fromkeys(name for record in valid for name in record.params if name != "method"))
    dimensions = [_dimension("method", [record.method for record in valid])]
    dimensions += [
        _dimension(name.rpartition(".")[2], [record.params.get(name) for record in valid]) for name in param_names
    ]
    log_params = [math.log10(max(record.trainable_params, 1)) for record in valid]
    ciders = [record.cider for record in valid]
    dimensions += [_dimension("log10 trainable params", log_params), _dimension("val CIDEr", ciders)]
    colour, colour_title = (ciders, "CIDEr") if options.color_by == "cider" else (log_params, "log10 params")
    figure = go.Figure(
        go.Parcoords(
            dimensions=dimensions,
            line={"color": colour, "colorscale": "Viridis", "showscale": True,
                  "colorbar": {"title": {"text": colour_title}}},
        )
    )
    figure.update_layout(margin={"l": 80, "r": 80, "t": 50})
    return figure, f"{len(valid)} trials, coloured by {colour_title}"


def epoch_curves_figure(analysis: StudyAnalysis, options: EpochCurvesOptions) -> tuple[go.Figure, str]:
    """Val CIDEr after each epoch: did the winners converge or stop early?"""
    trials = analysis.front if options.trials == "front" else analysis.valid
    figure = go.Figure()
    with_curves = [record for record in trials if record.epoch_cider]
    for record in with_curves:
        figure.add_trace(
            go.Scatter(
                x=list(range(1, len(record.epoch_cider) + 1)),
                y=list(record.epoch_cider),
                mode="lines+markers",
                name=record.label,
                hovertemplate=f"{record.label}<br>epoch %{{x}}: CIDEr %{{y:.4f}}<extra></extra>",
            )
        )
    figure.update_layout(
        xaxis={"title": {"text": "epoch"}, "dtick": 1},
        yaxis={"title": {"text": "val CIDEr"}},
    )
    return figure, f"{len(with_curves)} trials"


# Keyed by the view's options class, so the view kinds are named once (views.OPTIONS_BY_VIEW).
FIGURES: dict[type, Callable[[StudyAnalysis, Any], tuple[go.Figure, str]]] = {
    ParetoOptions: pareto_figure,
    HypervolumeOptions: hypervolume_figure,
    ParallelCoordinatesOptions: parallel_coordinates_figure,
    EpochCurvesOptions: epoch_curves_figure,
}


def render(view: ViewSpec, analysis: StudyAnalysis) -> go.Figure:
    """The view's figure with its title (plus what it shows, in numbers) and description."""
    figure, headline = FIGURES[type(view.options)](analysis, view.options)
    # plotly never wraps a subtitle: break it to the PNG's width (about 8 pixels a character).
    description = textwrap.wrap(view.description, width=max(view.png.width // 8, 40))
    figure.update_layout(
        # Pinned to the top: plotly would centre the title block in the top margin.
        title={"text": f"{view.title}: {headline}", "subtitle": {"text": "<br>".join(description)},
               "yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 20}},
        template=_TEMPLATE,
        # A figure's own top margin is room it needs below the title (parcoords' axis labels).
        margin={"t": 80 + 16 * len(description) + (figure.layout.margin.t or 0)},
    )
    return figure


def _write_pngs(figures: list[go.Figure], views: list[ViewSpec], paths: list[Path]) -> None:
    # One kaleido call renders every figure in a single browser session (a Chromium start is
    # seconds). kaleido uses plotly.py's bundled plotly.js, so PNGs match the HTML exactly.
    try:
        pio.write_images(
            figures, paths, width=[view.png.width for view in views], height=[view.png.height for view in views]
        )
    except RuntimeError as error:
        # plotly's own message suggests `plotly_get_chrome`, a download that fails offline.
        raise RuntimeError(
            "PNG export needs kaleido>=1 and a Chrome/Chromium binary on PATH or in $BROWSER_PATH: "
            "`pip install 'kaleido>=1'` and `apt-get install -y chromium`; the HTML dashboards "
            f"were written; pass png=False (qstudy report --no-png) to skip PNGs. ({error})"
        ) from error


def write_dashboards(
    analysis: StudyAnalysis, views: Sequence[ViewSpec], out_dir: str | Path, *, png: bool = True
) -> list[Path]:
    """Write every view as ``<name>.html`` (plotly.js inlined) and ``<name>.png``; return the paths."""
    views = list(views)
    figures = [render(view, analysis) for view in views]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_paths = [out_dir / f"{view.name}.html" for view in views]
    for figure, path in zip(figures, html_paths):
        # Inlining plotly.js (~5 MB a page) is what lets the page open offline and on clusters.
        figure.write_html(path, include_plotlyjs=True, full_html=True)
    if not png:
        return html_paths
    png_paths = [out_dir / f"{view.name}.png" for view in views]
    _write_pngs(figures, views, png_paths)
    return html_paths + png_paths
