"""Feature dashboards that travel: a static site, and the feature files of circuit-tracer's graph viewer.

``export_dashboard`` writes an index of the layers, a page per layer listing its features (sortable by
frequency, maximum activation and label) and a page per feature: its density, activation histogram, decoder norm
per target layer and a histogram of its direct logit effects over the vocabulary (plotly, drawn from
``plotly.min.js`` copied out of the installed plotly package, so the site opens from ``file://`` with no
network); its top contexts with every token shaded by the feature's activation; the tokens it promotes and
suppresses; and its nearest features by decoder direction, each a link. Everything comes from the feature
statistics (``feature_statistics(..., model=model)``) and the CLT's weights: no model runs.

``interop.export_feature_files`` writes the same pages' data for circuit-tracer's graph viewer.
"""

from __future__ import annotations

import functools
import html
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .clt import CrossLayerTranscoder
from .feature_effects import decoder_norms_by_target, feature_directions, unembedding
from .feature_pages import LogitTables, logit_tables, stored_contexts
from .features import FeatureStatistics
from .html import readable
from .models import LoadedModel

LOGIT_BINS = 40
"""Bins of each feature's histogram of direct logit effects."""


class Neighbours(NamedTuple):
    """Per feature, the features whose decoder vectors at its own layer point most nearly the same way."""

    layers: torch.Tensor
    """``(n_layers, d_features, n)`` source layer of each neighbour."""
    features: torch.Tensor
    """``(n_layers, d_features, n)``"""
    cosine: torch.Tensor
    """``(n_layers, d_features, n)`` cosine similarity, largest first."""


@torch.no_grad()
def decoder_neighbours(clt: CrossLayerTranscoder, n: int = 8) -> Neighbours:
    """Nearest features by the cosine of their decoder vectors at each feature's own layer, among every feature
    that writes there (for a CLT: the features of that layer and of every earlier one)."""
    F = clt.d_features
    out = [torch.zeros(clt.n_layers, F, n, dtype=torch.long) for _ in range(2)] + [
        torch.zeros(clt.n_layers, F, n)
    ]
    for target in range(clt.n_layers):
        sources = range(target + 1) if clt.config.cross_layer else [target]
        keys = torch.cat([clt.W_dec[s][:, target - s if clt.config.cross_layer else 0] for s in sources])
        keys = torch.nn.functional.normalize(keys.float(), dim=-1)  # (n_sources · F, d_model)
        queries = keys[-F:]  # this layer's own features come last
        cosine = queries @ keys.T
        cosine[torch.arange(F), len(keys) - F + torch.arange(F)] = -2.0  # not itself
        best = cosine.topk(min(n, len(keys) - 1), dim=1)
        layer_of = torch.tensor([s for s in sources for _ in range(F)])
        k = best.indices.shape[1]
        out[0][target, :, :k] = layer_of[best.indices]
        out[1][target, :, :k] = best.indices % F
        out[2][target, :, :k] = best.values
    return Neighbours(*out)


@torch.no_grad()
def logit_histograms(clt: CrossLayerTranscoder, U: torch.Tensor, bins: int = LOGIT_BINS) -> torch.Tensor:
    """``(n_layers, d_features, 2, bins + 1)``: per feature, the bin edges (row 0, ``bins + 1``) and counts (row 1,
    first ``bins``) of its direct logit effect on every token of the vocabulary."""
    U = U.float().to(clt.W_enc.device)
    out = torch.zeros(clt.n_layers, clt.d_features, 2, bins + 1)
    for layer in range(clt.n_layers):
        logits = feature_directions(clt, layer) @ U.T  # (d_features, vocab)
        lo, hi = logits.amin(1, keepdim=True), logits.amax(1, keepdim=True)
        width = (hi - lo).clamp_min(1e-12) / bins
        index = ((logits - lo) / width).long().clamp_(0, bins - 1)
        counts = torch.zeros(clt.d_features, bins).scatter_add_(1, index, torch.ones_like(logits))
        out[layer, :, 0] = (lo + width * torch.arange(bins + 1)).cpu()
        out[layer, :, 1, :bins] = counts.cpu()
    return out


class Pages:
    """What every page shows, gathered once: the statistics, logit tables and histograms, neighbours."""

    def __init__(
        self, stats: FeatureStatistics, clt: CrossLayerTranscoder, model: LoadedModel, neighbours: int
    ):
        if stats.context_ids is None:
            raise ValueError(
                "These feature statistics keep no context windows (an older cltlab computed them): compute them "
                "again with cltlab.feature_statistics(clt, buffer, model=model, save_dir=...)."
            )
        self.stats, self.clt, self.tokenizer, self.n_neighbours = stats, clt, model.tokenizer, neighbours
        self.unembedding = unembedding(model)
        if stats.top_logit_ids is not None:
            self.logits = LogitTables(
                stats.top_logit_ids, stats.top_logit_values, stats.bottom_logit_ids, stats.bottom_logit_values
            )
        else:
            self.logits = logit_tables(clt, self.unembedding)
        self._text: dict[int, str] = {}

    @functools.cached_property
    def logit_hist(self) -> torch.Tensor:
        """``logit_histograms`` of every feature (computed on first use: the feature files need none)."""
        return logit_histograms(self.clt, self.unembedding)

    @functools.cached_property
    def neighbours(self) -> Neighbours:
        """``decoder_neighbours`` of every feature (computed on first use)."""
        return decoder_neighbours(self.clt, self.n_neighbours)

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = readable(self.tokenizer.decode([token]))
        return self._text[token]

    def contexts(
        self, layer: int, feature: int, band: int | None = None
    ) -> list[tuple[float, list[str], list[float], int]]:
        """The top contexts (or those sampled from activation ``band``), each as its activation, the window's
        token texts, their activations and the index of its own token."""
        return [
            (c.activation, [self.text(t) for t in c.ids], c.acts, c.index)
            for c in stored_contexts(self.stats, layer, feature, band)
        ]

    def label(self, layer: int, feature: int) -> str:
        """The token the feature fires on most often among its top contexts ("" for a dead feature)."""
        ids = self.stats.context_ids[layer, feature, :, self.stats.before]
        ids = ids[ids >= 0]
        return self.text(int(ids.mode().values)) if len(ids) else ""


def export_dashboard(
    stats: FeatureStatistics,
    clt: CrossLayerTranscoder,
    model: LoadedModel,
    out_dir: str | Path,
    *,
    features: dict[int, list[int]] | None = None,
    neighbours: int = 8,
    progress: bool = True,
) -> Path:
    """Write the static dashboard into ``out_dir``; return its ``index.html``.

    ``features``: ``{layer: [feature, ...]}`` to write pages for (default: every feature of every layer); the
    layer lists always name every feature, linking those that have a page.
    """
    out = Path(out_dir)
    pages = Pages(stats, clt, model, neighbours)
    chosen = features or {layer: list(range(stats.d_features)) for layer in range(stats.n_layers)}
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_plotly_js(), out / "plotly.min.js")
    offset = stats.layer_offset
    rows = []
    for layer in range(stats.n_layers):
        rows.append(
            f'<tr><td><a href="layer_{layer}.html">layer {layer + offset}</a></td>'
            f"<td>{int((stats.frequency[layer] > 0).sum())}</td><td>{(stats.frequency[layer] == 0).float().mean().item():.1%}</td></tr>"
        )
        _write(out / f"layer_{layer}.html", _layer_page(pages, layer, set(chosen.get(layer, []))))
    body = (
        f"<h1>Feature dashboard</h1><p>{stats.n_layers} layers × {stats.d_features} features, statistics over "
        f"{stats.n_tokens:,} tokens.</p><table><thead><tr><th>layer</th><th>live features</th><th>dead</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    _write(out / "index.html", _document("Feature dashboard", body, root=""))
    total = sum(len(v) for v in chosen.values())
    with tqdm(total=total, desc="dashboard pages", unit="page", disable=not progress) as bar:
        for layer, picked in chosen.items():
            (out / "features" / f"L{layer}").mkdir(parents=True, exist_ok=True)
            for feature in picked:
                _write(
                    out / "features" / f"L{layer}" / f"{feature}.html",
                    _feature_page(pages, layer, feature, chosen),
                )
                bar.update()
    return out / "index.html"


def _layer_page(pages: Pages, layer: int, linked: set[int]) -> str:
    stats = pages.stats
    rows = []
    for feature in stats.order(layer, "frequency"):
        name = (
            f'<a href="features/L{layer}/{feature}.html">{feature}</a>' if feature in linked else str(feature)
        )
        frequency, peak = stats.frequency[layer, feature].item(), stats.max_activation[layer, feature].item()
        label = pages.label(layer, feature)
        rows.append(
            f'<tr><td data-value="{feature}">{name}</td><td data-value="{frequency}">{frequency:.3%}</td>'
            f'<td data-value="{peak}">{peak:.3f}</td><td data-value="{html.escape(label)}"><code>'
            f"{html.escape(label)}</code></td></tr>"
        )
    head = "".join(
        f'<th onclick="sortBy(this, {i})">{name} ⇅</th>'
        for i, name in enumerate(["feature", "frequency", "max activation", "label"])
    )
    body = (
        f'<p><a href="index.html">all layers</a></p><h1>Layer {layer + stats.layer_offset}</h1>'
        f'<table id="features"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f"<script>{SORT_JS}</script>"
    )
    return _document(f"Layer {layer + stats.layer_offset}", body, root="")


def _feature_page(pages: Pages, layer: int, feature: int, chosen: dict[int, list[int]]) -> str:
    stats, offset = pages.stats, pages.stats.layer_offset
    title = f"Layer {layer + offset} · feature {feature}"
    frequency = stats.frequency[layer, feature].item()
    if frequency == 0:
        summary = f'<p class="dead"><b>dead</b>: it never fired on {stats.n_tokens:,} tokens.</p>'
    else:
        summary = (
            f"<p>density {frequency:.3%} ({round(frequency * stats.n_tokens):,} of {stats.n_tokens:,} tokens) · max "
            f"{stats.max_activation[layer, feature]:.3f} · mean {stats.mean_activation[layer, feature]:.3f}</p>"
        )
    vmax = stats.max_activation[layer, feature].item()

    def rows(found) -> str:
        return "".join(
            f"<tr><td>{value:.3f}</td><td>{_tokens(texts, acts, vmax, focus)}</td></tr>"
            for value, texts, acts, focus in found
        )

    contexts = (
        rows(pages.contexts(layer, feature)) or "<tr><td colspan=2><i>This feature never fired.</i></td></tr>"
    )
    if stats.band_rows is not None:
        for band in reversed(range(stats.band_rows.shape[2])):
            lo, hi = band / stats.band_rows.shape[2], (band + 1) / stats.band_rows.shape[2]
            sampled = rows(pages.contexts(layer, feature, band))
            if sampled:
                contexts += f"<tr><th colspan=2>sampled from ({lo:.2f}, {hi:.2f}] × max</th></tr>{sampled}"
    logits = pages.logits
    effects = "".join(
        f"<tr><td><code>{html.escape(pages.text(int(logits.top_ids[layer, feature, i])))}</code></td>"
        f"<td>{logits.top_values[layer, feature, i]:+.3g}</td>"
        f"<td><code>{html.escape(pages.text(int(logits.bottom_ids[layer, feature, i])))}</code></td>"
        f"<td>{logits.bottom_values[layer, feature, i]:+.3g}</td></tr>"
        for i in range(logits.top_ids.shape[-1])
    )

    related = _related(pages, layer, feature, chosen)
    body = (
        f'<p><a href="../../index.html">all layers</a> · <a href="../../layer_{layer}.html">layer {layer + offset}'
        f"</a></p><h1>{title}</h1>{summary}"
        '<div class="plots"><div id="activations"></div><div id="norms"></div><div id="logits"></div></div>'
        f'<div class="columns"><div><h2>Top activations</h2><table class="contexts">{contexts}</table></div>'
        "<div><h2>Direct logit effects</h2><table><thead><tr><th>promotes</th><th></th><th>suppresses</th><th></th>"
        f"</tr></thead><tbody>{effects}</tbody></table>"
        f"{related}</div></div>"
        f"<script>{_plots_js(pages, layer, feature)}</script>"
    )
    return _document(title, body, root="../../")


def _tokens(texts: list[str], values: list[float], vmax: float, focus: int) -> str:
    """A context's tokens, each shaded by its activation ÷ ``vmax`` (hover: the value), the top one outlined; in
    as few bytes as the style sheet allows (a dashboard has thousands of pages)."""
    spans = []
    for i, (text, value) in enumerate(zip(texts, values, strict=True)):
        alpha = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
        mark = ' class="f"' if i == focus else ""
        spans.append(f'<i{mark} style="--a:{alpha:.2f}" title="{value:.3f}">{html.escape(text)}</i>')
    return f'<div class="ctx">{"".join(spans)}</div>'


def _related(pages: Pages, layer: int, feature: int, chosen: dict[int, list[int]]) -> str:
    """The nearest features by decoder direction and the most correlated ones, as lists of links."""
    stats, offset = pages.stats, pages.stats.layer_offset
    frequency = stats.frequency[layer, feature].item()

    def link(other_layer: int, other: int, css: str, score: str) -> str:
        name = f"layer {other_layer + offset} · feature {other}"
        if other in chosen.get(other_layer, []):
            name = f'<a class="{css}" href="../L{other_layer}/{other}.html">{name}</a>'
        return f"<li>{name} ({score})</li>"

    near = pages.neighbours
    links = "".join(
        link(int(near.layers[layer, feature, i]), int(near.features[layer, feature, i]), "neighbour",
             f"cosine {near.cosine[layer, feature, i]:.3f}")
        for i in range(near.features.shape[-1])
    )  # fmt: skip
    correlated = ""
    if stats.correlated is not None and frequency > 0:
        items = "".join(
            link(layer, int(other), "correlated", f"correlation {value:.3f}")
            for other, value in zip(stats.correlated[layer, feature], stats.correlation[layer, feature].tolist(), strict=True)
        )  # fmt: skip
        correlated = f"<h2>Most correlated in activation (layer {layer + offset})</h2><ol>{items}</ol>"
    nearest = f"<h2>Nearest by decoder direction (at layer {layer + offset})</h2><ol>{links}</ol>"
    return nearest + correlated


def _plots_js(pages: Pages, layer: int, feature: int) -> str:
    stats, offset = pages.stats, pages.stats.layer_offset
    counts, edges = stats.histogram[layer, feature], stats.bin_edges
    nonzero = counts.nonzero().squeeze(1)
    lo, hi = (nonzero.min().item(), nonzero.max().item() + 1) if len(nonzero) else (0, 0)
    centres = (edges[:-1] * edges[1:]).sqrt()
    norms = decoder_norms_by_target(pages.clt, layer, feature)
    logit_edges, logit_counts = pages.logit_hist[layer, feature]
    plots = {
        "activations": (
            [
                {
                    "type": "bar",
                    "x": centres[lo:hi].tolist(),
                    "y": counts[lo:hi].tolist(),
                    "marker": {"color": "#ff7f0e"},
                }
            ],
            {
                "title": {"text": "activation histogram"},
                "xaxis": {"type": "log", "title": {"text": "activation"}},
            },
        ),
        "norms": (
            [{"type": "bar", "x": [layer + offset + t for t in range(len(norms))], "y": norms.tolist()}],
            {
                "title": {"text": "decoder norm per target layer"},
                "xaxis": {"title": {"text": "target layer"}, "dtick": 1},
            },
        ),
        "logits": (
            [
                {
                    "type": "bar",
                    "x": ((logit_edges[:-1] + logit_edges[1:]) / 2).tolist(),
                    "y": logit_counts[:-1].tolist(),
                    "marker": {"color": "#2ca02c"},
                }
            ],
            {
                "title": {"text": "logit effects over the vocabulary"},
                "xaxis": {"title": {"text": "logit change per unit"}},
                "yaxis": {"type": "log"},
            },
        ),
    }
    layout = {"height": 280, "width": 420, "margin": {"t": 40, "b": 45, "l": 50, "r": 10}, "bargap": 0.05}
    calls = [
        f"Plotly.newPlot({json.dumps(div)}, {json.dumps(data)}, {json.dumps({**layout, **extra})}, "
        '{"displaylogo": false, "responsive": false});'
        for div, (data, extra) in plots.items()
    ]
    return "\n".join(calls)


SORT_JS = """
function sortBy(th, column) {
  const body = th.closest('table').tBodies[0];
  const down = th.dataset.order !== 'down';
  th.dataset.order = down ? 'down' : 'up';
  const key = row => row.cells[column].dataset.value;
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
    const order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
    return down ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
}
"""

STYLE = """
body { font-family: sans-serif; margin: 20px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: left; vertical-align: top; }
th { cursor: pointer; background: #eee; } .plots { display: flex; flex-wrap: wrap; }
.columns { display: flex; gap: 30px; } .dead { color: #c00; }
.ctx { font-family: monospace; white-space: pre-wrap; line-height: 1.7; }
.ctx i { font-style: normal; background: rgba(255, 127, 14, var(--a)); } .ctx i.f { outline: 1px solid #333; }
"""


def _document(title: str, body: str, *, root: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<script src="{root}plotly.min.js"></script><style>{STYLE}</style></head><body>{body}</body></html>'
    )


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _plotly_js() -> Path:
    """The plotly.js bundle of the installed plotly package (what makes the pages work offline)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"The installed plotly package has no {path}; reinstall plotly.")
    return path
