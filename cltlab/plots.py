"""Plotly figures for the notebooks: training curves, per-layer replacement metrics, activation scales."""

from __future__ import annotations

import csv
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .buffer import DiscBuffer
from .features import LayerStatistics
from .replacement import ReplacementMetrics


def read_metrics(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's CSV logs as ``{metric: [(step, value), ...]}``.

    Each ``train`` call logs to its own ``version_N`` folder; a later version replaces the earlier rows from its
    first step on, so a resumed run continues its curves and a fresh run in the same folder replaces them.
    """
    files = sorted(
        Path(log_dir).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not files:
        raise FileNotFoundError(f"No version_*/metrics.csv under {log_dir}: has this run been trained?")
    rows: list[dict[str, str]] = []
    for path in files:
        with open(path, newline="") as f:
            new = list(csv.DictReader(f))
        if new:
            first = int(new[0]["step"])
            rows = [r for r in rows if int(r["step"]) < first] + new
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step", "epoch") and value not in ("", None):
                series.setdefault(key, []).append((step, float(value)))
    return series


def training_curves(
    log_dir: str | Path,
    metrics: tuple[str, ...] = ("loss", "nmse", "l0", "dead_frac"),
    held_out: tuple[str, ...] = ("kl", "top1", "ce_recovered"),
) -> go.Figure:
    """Loss, NMSE, L0 and dead fraction of a run against the step. Where the run validated on held-out text
    (``TrainerConfig.val_every``), the held-out NMSE and L0 are drawn over the training ones, and held-out KL,
    top-1 agreement and CE recovered get a panel each; an end-to-end fine-tune (``FinetuneConfig``) adds its
    training KL."""
    series = read_metrics(log_dir)
    panels = [*metrics, *(f"val/{name}" for name in held_out if f"val/{name}" in series)]
    panels += [name for name in ("e2e/kl",) if name in series]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    titles = [name.replace("val/", "held-out ").replace("e2e/", "end-to-end ") for name in panels]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    for i, name in enumerate(panels):
        row, col = divmod(i, cols)
        over = [f"val/{name}"] if name in metrics and f"val/{name}" in series else []
        for key in (name, *over):
            points = series.get(key, [])  # a metric never logged is an empty panel
            mode = "lines+markers" if key.startswith("val/") else "lines"
            trace = go.Scatter(x=[s for s, _ in points], y=[v for _, v in points], name=key, mode=mode)
            fig.add_trace(trace, row=row + 1, col=col + 1)
        fig.update_xaxes(title_text="step", row=row + 1, col=col + 1)
    fig.update_layout(height=320 * rows, showlegend=False, title="Training")
    return fig


def layer_metrics(metrics: ReplacementMetrics, layer_offset: int = 0) -> go.Figure:
    """NMSE and L0 of the replacement model, per layer."""
    layers = list(range(layer_offset, layer_offset + len(metrics.nmse)))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("NMSE per layer", "L0 per layer"))
    fig.add_trace(go.Bar(x=layers, y=metrics.nmse, name="NMSE"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=metrics.l0, name="L0"), row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(height=320, showlegend=False)
    return fig


def activation_scales(buffer: DiscBuffer) -> go.Figure:
    """The per-layer normalization scales of ``resid_mid`` and ``mlp_out`` stored in a buffer."""
    stats = buffer.stats
    layers = list(range(buffer.layer_start, buffer.layer_start + buffer.n_layers))
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=layers, y=stats.input_scale.flatten().tolist(), name="resid_mid", mode="lines+markers")
    )
    fig.add_trace(
        go.Scatter(x=layers, y=stats.output_scale.flatten().tolist(), name="mlp_out", mode="lines+markers")
    )
    fig.update_layout(height=320, title="RMS scale per layer", xaxis_title="layer", yaxis_type="log")
    return fig


def feature_frequencies(stats: LayerStatistics) -> go.Figure:
    """Histogram of log10 activation frequency of the live features of one layer."""
    live = stats.frequency[stats.frequency > 0]
    fig = go.Figure(go.Histogram(x=live.log10().tolist(), nbinsx=40))
    fig.update_layout(
        height=300,
        xaxis_title="log10 frequency",
        yaxis_title="features",
        title=f"Layer {stats.layer}: {len(live)} live features, {stats.dead_fraction:.1%} dead",
    )
    return fig
