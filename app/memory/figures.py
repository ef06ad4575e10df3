"""The memory estimate as plotly figures: stacked bars, one colour per term (built from plain numbers, no torch)."""
from __future__ import annotations

from app import methods
from app.memory.estimate import GIB, Breakdown, MemoryEstimate, gib


TERM_COLOURS = {
    "weights": "#4C78A8", "master_weights": "#9ECAE9", "gradients": "#F58518", "optimizer": "#E45756",
    "activations": "#54A24B", "logits": "#88D27A", "temporary": "#B279A2", "allocator_slack": "#BAB0AC",
    "cuda_context": "#79706E", "process": "#79706E", "loading": "#D4A6C8", "allreduce": "#FF9DA6", "gathered": "#72B7B2",
}


def _stacked_bars(x: list[str], breakdowns: list[Breakdown], title: str, legend: bool, bottom: int,
                  totals_on_top: bool = True):
    """One stacked bar per breakdown, a colour per term (built from plain dicts: 3x faster than trace by trace)."""
    import plotly.graph_objects as go

    keys = list(dict.fromkeys(t.key for bd in breakdowns for t in bd.terms))
    labels = {t.key: t.label for bd in breakdowns for t in bd.terms}
    data = [dict(type="bar", name=labels[key], x=x, y=[bd.term(key) / GIB for bd in breakdowns],
                 marker=dict(color=TERM_COLOURS.get(key)), showlegend=legend,
                 hovertemplate=f"{labels[key]}: %{{y:.2f}} GiB<extra></extra>") for key in keys]
    totals = [dict(x=label, y=bd.total_bytes / GIB, text=gib(bd.total_bytes), showarrow=False, yshift=10)
              for label, bd in zip(x, breakdowns)] if totals_on_top else []
    layout = dict(barmode="stack", yaxis=dict(title=dict(text="GiB")), height=380, annotations=totals,
                  margin=dict(l=40, r=10, t=30, b=bottom), legend=dict(font=dict(size=10)),
                  title=dict(text=title, font=dict(size=14)))
    return go.Figure(dict(data=data, layout=layout))


def breakdown_figure(estimate: MemoryEstimate):
    """Stacked bars: the GPU and the CPU-RAM estimate of the chosen settings, term by term."""
    return _stacked_bars([estimate.gpu.title, "CPU RAM"], [estimate.gpu, estimate.cpu], "This run", True, 30)


def methods_figure(estimates: list[MemoryEstimate], chosen: str, device: str = "cuda"):
    """Stacked bars: the same model, batch and length under every method (the chosen one marked)."""
    breakdowns = [e.gpu if device == "cuda" else e.cpu for e in estimates]
    # the total goes under the name: above a dozen narrow bars the numbers would collide
    labels = [f"{'▶ ' if e.inputs.method == chosen else ''}{methods.get_method(e.inputs.method).label}<br>{gib(bd.total_bytes)}"
              for e, bd in zip(estimates, breakdowns)]
    where = "GPU" if device == "cuda" else "CPU RAM"
    return _stacked_bars(labels, breakdowns, f"Every method ({where})", False, 110, totals_on_top=False)
