"""Draws a study's trials as interactive plotly dashboards and writes them as offline HTML and PNG.

Four views (``dashboards/README.md`` describes each): the Pareto scatter, the hypervolume
history, parallel coordinates of the hyperparameters, and the per-epoch CIDEr curves of the
front. Each is written as a standalone HTML page with plotly.js inlined, so it opens with no
network, and as a PNG rendered by kaleido in a headless Chromium (for READMEs and reports).

This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from qstudy.analysis.pareto import (
    TrialRecord,
    default_reference,
    hypervolume_history,
    knee_point,
    pareto_front,
    valid_records,
)

PNG_WIDTH = 1100
PNG_HEIGHT = 650
_TEMPLATE = "plotly_white"
_TRIAL_HOVER = "%{text}<br>val CIDEr %{y:.4f}<br>%{x:,} trainable params<extra>trial %{customdata}</extra>"


def pareto_figure(records: Iterable[TrialRecord], front: Sequence[TrialRecord], knee: TrialRecord | None) -> go.Figure:
    """CIDEr against trainable parameters (log axis), one trace per method, the front as a step line."""
    valid = valid_records(records)
    figure = go.Figure()
    for method in sorted({record.method for record in valid}):
        trials = [record for record in valid if record.method == method]
        figure.add_trace(
            go.Scatter(
                x=[record.trainable_params for record in trials],
                y=[record.cider for record in trials],
                mode="markers",
                name=method,
                text=[record.label for record in trials],
                customdata=[record.trial_id for record in trials],
                hovertemplate=_TRIAL_HOVER,
                marker={"size": 10, "opacity": 0.85},
            )
        )
    # "hv" steps right then up: between two front points, the region a cheaper trial already
    # dominates ends where the next, larger trial starts to beat it.
    figure.add_trace(
        go.Scatter(
            x=[record.trainable_params for record in front],
            y=[record.cider for record in front],
            mode="lines",
            line={"shape": "hv", "color": "black", "dash": "dot"},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    if knee is not None:
        figure.add_trace(
            go.Scatter(
                x=[knee.trainable_params],
                y=[knee.cider],
                mode="markers",
                name=f"knee: {knee.label}",
                text=[knee.label],
                customdata=[knee.trial_id],
                hovertemplate=_TRIAL_HOVER,
                marker={"symbol": "star", "size": 20, "color": "gold", "line": {"color": "black", "width": 1}},
            )
        )
    figure.update_layout(
        title={"text": f"Val CIDEr vs trainable parameters: {len(valid)} trials, {len(front)} on the Pareto front"},
        xaxis={"title": {"text": "trainable parameters (log scale)"}, "type": "log"},
        yaxis={"title": {"text": "val CIDEr"}},
        legend={"title": {"text": "method"}},
        template=_TEMPLATE,
    )
    return figure


def hypervolume_figure(history: Sequence[tuple[int, float]], reference: tuple[float, float] | None = None) -> go.Figure:
    """The dominated hypervolume after each trial: flat stretches are trials that improved nothing."""
    title = "Hypervolume of the Pareto front over trials"
    if reference is not None:
        title += f" (reference: CIDEr {reference[0]:g}, {reference[1]:,.0f} params)"
    figure = go.Figure(
        go.Scatter(
            x=[order for order, _ in history],
            y=[volume for _, volume in history],
            mode="lines+markers",
            line={"shape": "hv"},
            name="hypervolume",
            hovertemplate="after trial %{x}: %{y:.4g}<extra></extra>",
        )
    )
    figure.update_layout(
        title={"text": title},
        xaxis={"title": {"text": "trial (completion order)"}},
        yaxis={"title": {"text": "hypervolume (CIDEr x trainable params)"}},
        template=_TEMPLATE,
    )
    return figure


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


def parallel_coordinates_figure(records: Iterable[TrialRecord]) -> go.Figure:
    """One line per valid trial across its hyperparameters, then its size and CIDEr, coloured by CIDEr.

    A hyperparameter some methods lack (LoRA's alpha for a Q-Adapter trial) reads "n/a" on a
    categorical axis rather than dropping the trial's line.
    """
    valid = valid_records(records)
    param_names = list(dict.fromkeys(name for record in valid for name in record.params if name != "method"))
    dimensions = [_dimension("method", [record.method for record in valid])]
    dimensions += [_dimension(name, [record.params.get(name) for record in valid]) for name in param_names]
    dimensions += [
        _dimension("log10 trainable params", [math.log10(max(record.trainable_params, 1)) for record in valid]),
        _dimension("val CIDEr", [record.cider for record in valid]),
    ]
    ciders = [record.cider for record in valid]
    figure = go.Figure(
        go.Parcoords(
            dimensions=dimensions,
            line={"color": ciders, "colorscale": "Viridis", "showscale": True, "colorbar": {"title": {"text": "CIDEr"}}},
        )
    )
    figure.update_layout(
        title={"text": f"Hyperparameters of {len(valid)} trials, coloured by val CIDEr"},
        template=_TEMPLATE,
        margin={"l": 80, "r": 80, "t": 110},
    )
    return figure


def epoch_curves_figure(front: Sequence[TrialRecord]) -> go.Figure:
    """Val CIDEr after each epoch for the front's trials: did the winners converge or stop early?"""
    figure = go.Figure()
    for record in front:
        if record.epoch_cider:
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
        title={"text": "Per-epoch val CIDEr of the Pareto-front trials"},
        xaxis={"title": {"text": "epoch"}, "dtick": 1},
        yaxis={"title": {"text": "val CIDEr"}},
        template=_TEMPLATE,
    )
    return figure


def _write_pngs(figures: list[go.Figure], paths: list[Path]) -> None:
    # One kaleido call renders every figure in a single browser session (a Chromium start is
    # seconds). kaleido uses plotly.py's bundled plotly.js, so PNGs match the HTML exactly.
    try:
        pio.write_images(figures, paths, width=PNG_WIDTH, height=PNG_HEIGHT)
    except RuntimeError as error:
        # plotly's own message suggests `plotly_get_chrome`, a download that fails offline.
        raise RuntimeError(
            "PNG export needs kaleido>=1 and a Chrome/Chromium binary on PATH or in $BROWSER_PATH: "
            "`pip install 'kaleido>=1'` and `apt-get install -y chromium`; the HTML dashboards "
            f"were written; pass png=False to skip PNGs. ({error})"
        ) from error


def write_dashboards(
    records: Iterable[TrialRecord],
    out_dir: str | Path,
    reference: tuple[float, float] | None = None,
    *,
    png: bool = True,
) -> list[Path]:
    """Write every view as ``<view>.html`` (plotly.js inlined) and ``<view>.png``; return the paths.

    ``reference`` is the hypervolume reference point, :func:`default_reference` when None.
    """
    records = list(records)
    reference = reference if reference is not None else default_reference(records)
    front = pareto_front(records)
    figures = {
        "pareto": pareto_figure(records, front, knee_point(front)),
        "hypervolume": hypervolume_figure(hypervolume_history(records, reference), reference),
        "parallel_coordinates": parallel_coordinates_figure(records),
        "epoch_curves": epoch_curves_figure(front),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_paths = [out_dir / f"{name}.html" for name in figures]
    for figure, path in zip(figures.values(), html_paths):
        # Inlining plotly.js (~5 MB a page) is what lets the page open offline and on clusters.
        figure.write_html(path, include_plotlyjs=True, full_html=True)
    if not png:
        return html_paths
    png_paths = [out_dir / f"{name}.png" for name in figures]
    _write_pngs(list(figures.values()), png_paths)
    return html_paths + png_paths
