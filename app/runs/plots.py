"""Plotly figures of training curves, built from plain (step, value) lists so they can be tested without a UI."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative

Points = Sequence[tuple[float, float | None]]  # (step, value); None is a gap (a NaN loss, a missing field)
COLORS = qualitative.Plotly


def smoothing_weight(n: int) -> float:
    """About a tenth of the curve's points in the average: heavy smoothing on a short run hides its whole shape."""
    return min(0.95, max(0.0, 1.0 - 10.0 / max(n, 1)))


def smooth(values: Sequence[float | None], weight: float | None = None) -> list[float | None]:
    """Exponential moving average, de-biased (as TensorBoard does) so the first points are not pulled towards 0.

    A gap stays a gap and does not disturb the average around it."""
    w = smoothing_weight(len(values)) if weight is None else weight
    if not 0 <= w < 1:
        raise ValueError(f"weight={w!r}: must be at least 0 and below 1")
    out: list[float | None] = []
    avg, n = 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        avg, n = w * avg + (1 - w) * v, n + 1
        out.append(avg / (1 - w**n) if w else avg)
    return out


def _xy(points: Points) -> tuple[list[float], list[float | None]]:
    return [p[0] for p in points], [p[1] for p in points]


def _whole_steps(fig: go.Figure, *series: Points) -> None:
    """A short run would otherwise get ticks at step 1.5."""
    last = max((p[0] for points in series for p in points), default=0)
    if last <= 12:
        fig.update_xaxes(dtick=1)


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(
        title=title or None,
        template="plotly_white",
        hovermode="x unified",
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0),
        margin=dict(l=50, r=50, t=60 if title else 30, b=40),
        uirevision="keep",  # a live refresh keeps the user's zoom
        height=380,
    )
    fig.update_xaxes(title_text="step")
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank chart that says why it is blank (no run chosen, waiting for the first step)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(template="plotly_white", height=380, margin=dict(l=20, r=20, t=20, b=20))
    return fig


def loss_figure(train: Points, eval: Points = (), lr: Points = (), title: str = "",
                extra: Mapping[str, Points] | None = None) -> go.Figure:
    """One run: raw training loss (faint), its smoothed curve, validation loss, and the learning rate on a right axis;
    `extra` (label -> points) are the other metrics of the run's objective, in a panel of their own below the loss."""
    extra = {label: points for label, points in (extra or {}).items() if points}
    if not train and not eval:
        return empty_figure("Waiting for the first logged step…")
    fig = go.Figure()
    if train:
        steps, loss = _xy(train)
        fig.add_trace(go.Scatter(x=steps, y=loss, name="train loss", mode="lines",
                                 line=dict(color=COLORS[0], width=1), opacity=0.35))
        fig.add_trace(go.Scatter(x=steps, y=smooth(loss), name="train loss (smoothed)", mode="lines",
                                 line=dict(color=COLORS[0], width=2.5)))
    if eval:
        x, y = _xy(eval)
        fig.add_trace(go.Scatter(x=x, y=y, name="validation loss", mode="lines+markers",
                                 line=dict(color=COLORS[1], width=2)))
    if lr:
        x, y = _xy(lr)
        fig.add_trace(go.Scatter(x=x, y=y, name="learning rate", mode="lines", yaxis="y2",
                                 line=dict(color="gray", width=1, dash="dot")))
        # rangemode: a constant rate would otherwise sit mid-axis on a -1..1 scale
        fig.update_layout(yaxis2=dict(title_text="learning rate", overlaying="y", side="right", showgrid=False,
                                      exponentformat="e", rangemode="tozero"))
    fig.update_yaxes(title_text="loss", selector=dict(overlaying=None))
    for i, (label, points) in enumerate(extra.items()):
        x, y = _xy(points)
        fig.add_trace(go.Scatter(x=x, y=y, name=label, mode="lines+markers", yaxis="y3",
                                 line=dict(color=COLORS[(i + 2) % len(COLORS)], width=2)))
    _whole_steps(fig, train, eval, *extra.values())
    fig = _layout(fig, title)
    if extra:  # loss on top, the objective's own metrics (accuracies, rewards: other scales) underneath
        fig.update_layout(height=560, yaxis=dict(domain=[0.42, 1]), xaxis=dict(anchor="y3"),
                          yaxis3=dict(domain=[0, 0.32], anchor="x", title_text="other metrics"))
    return fig


def overlay_figure(curves: Mapping[str, tuple[Points, Points]], title: str = "") -> go.Figure:
    """Several runs on one chart: each label's smoothed training loss (solid) and validation loss (dashed), one colour each."""
    if not any(train or eval for train, eval in curves.values()):
        return empty_figure("No logged steps in the chosen runs yet.")
    fig = go.Figure()
    for i, (label, (train, eval)) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        if train:
            steps, loss = _xy(train)
            fig.add_trace(go.Scatter(x=steps, y=smooth(loss), name=f"{label} train", mode="lines",
                                     line=dict(color=color, width=2), legendgroup=label))
        if eval:
            x, y = _xy(eval)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{label} validation", mode="lines+markers",
                                     line=dict(color=color, width=2, dash="dash"), legendgroup=label))
    fig.update_yaxes(title_text="loss")
    _whole_steps(fig, *(points for pair in curves.values() for points in pair))
    return _layout(fig, title)
