"""Plotly figures the weeks share: distributions by group, learning curves, per-token bars, calibration.

Every figure names its axes and units; functions return the figure so a notebook can ``.show()`` or restyle it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go

TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, xaxis_title=x_title, yaxis_title=y_title,
                      margin=dict(l=60, r=20, t=50, b=50), height=kw.pop("height", 380), **kw)
    return fig


def box_by_group(values: Sequence[float], groups: Sequence[str], *, title: str, y_title: str,
                 x_title: str = "", order: Sequence[str] | None = None) -> go.Figure:
    """One box per group (e.g. true reward by response style), groups in ``order`` or by median, best first."""
    by: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        by.setdefault(g, []).append(v)
    if order is None:
        order = sorted(by, key=lambda g: -sorted(by[g])[len(by[g]) // 2])
    fig = go.Figure([go.Box(y=by[g], name=g, boxmean=True) for g in order if g in by])
    return _layout(fig, title, x_title, y_title, showlegend=False)


def curves(x: Sequence[float], ys: Mapping[str, Sequence[float]], *, title: str, x_title: str, y_title: str,
           mode: str = "lines+markers") -> go.Figure:
    """Several named curves over the same ``x`` (learning curves, sweeps)."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode=mode, name=name) for name, y in ys.items()])
    return _layout(fig, title, x_title, y_title)


def token_bars(tokens: Sequence[str], values: Sequence[float], *, title: str, y_title: str) -> go.Figure:
    """A bar per token (e.g. its log-probability), labelled with the token text."""
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=labels, y=list(values)))
    return _layout(fig, title, "token (position: text)", y_title)


def calibration(predicted: Sequence[float], observed: Sequence[float], counts: Sequence[int], *,
                title: str = "Calibration") -> go.Figure:
    """Reliability diagram: mean predicted probability per bin against the observed frequency."""
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash", color="grey")),
        go.Scatter(x=list(predicted), y=list(observed), mode="lines+markers", name="model",
                   text=[f"n={c}" for c in counts]),
    ])
    return _layout(fig, title, "predicted probability", "observed frequency")
