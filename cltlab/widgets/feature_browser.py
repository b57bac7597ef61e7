"""FeatureBrowser: pick a layer and a feature of a CLT and see what it reads, where it writes, and how often."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..buffer import DiscBuffer
from ..clt import CrossLayerTranscoder
from ..feature_effects import (
    TokenEffects,
    decoder_norms_by_target,
    feature_activations,
    logit_effects,
    unembedding,
)
from ..feature_pages import stored_contexts
from ..features import FeatureStatistics
from ..html import code, shaded_tokens, table, token_text
from ..models import LoadedModel
from .snapshot import StaticCopy

SORTS = [("index", "index"), ("frequency", "frequency"), ("max activation", "max_activation")]
FULL_PREFIX = 1 << 30
"""``before`` that asks the buffer for a token's whole sequence (the model needs it to recompute activations)."""


class FeatureBrowser(StaticCopy, widgets.VBox):
    """Browse the features of a CLT, one at a time.

    Choose a layer and a feature (a rank slider over the features sorted by index, frequency or maximum
    activation, or the feature number) and see: the top contexts from the buffer with every token shaded by the
    feature's activation on it (kept by ``feature_statistics``, so that a switch runs no model; recomputed through
    the model for statistics without them); its activation histogram;
    its decoder norm per target layer (where the feature writes); the output tokens its decoder vectors promote
    and suppress through the unembedding; its density among the layer's features. Dead features are marked.

    Attributes (the child widgets):
        layer, sort, rank, feature: the controls (``layer`` holds the CLT layer; its labels are model layers).
        header: HTML line naming the feature with its density, maximum and mean (or ``dead``).
        figure: ``go.FigureWidget``: activation histogram | decoder norm per target layer | layer density.
        contexts: HTML of the top contexts (``span.cltlab-token`` per token, the top token outlined).
        tokens: HTML tables of the promoted and suppressed tokens.
    """

    def __init__(
        self,
        stats: FeatureStatistics,
        clt: CrossLayerTranscoder,
        model: LoadedModel,
        buffer: DiscBuffer,
        *,
        n_contexts: int = 8,
        before: int = 12,
        after: int = 4,
        n_tokens: int = 8,
    ):
        if (stats.n_layers, stats.d_features) != (clt.n_layers, clt.d_features):
            raise ValueError(
                f"The statistics cover {stats.n_layers} layers × {stats.d_features} features but the CLT has "
                f"{clt.n_layers} × {clt.d_features}; compute them for this CLT with cltlab.feature_statistics."
            )
        self.stats, self.clt, self.model, self.buffer = stats, clt, model, buffer
        self.n_contexts, self.before, self.after, self.n_tokens = n_contexts, before, after, n_tokens
        self._unembedding = unembedding(model)
        offset = stats.layer_offset
        last = stats.d_features - 1
        self.layer = widgets.Dropdown(
            options=[(str(layer + offset), layer) for layer in range(stats.n_layers)], description="layer"
        )
        self.sort = widgets.Dropdown(options=SORTS, value="frequency", description="sort by")
        self.rank = widgets.IntSlider(0, min=0, max=last, description="rank", continuous_update=False)
        self.feature = widgets.BoundedIntText(0, min=0, max=last, description="feature")
        self.header = widgets.HTML()
        self.figure = _figure()
        self.contexts = widgets.HTML(layout=widgets.Layout(width="62%"))
        self.tokens = widgets.HTML(layout=widgets.Layout(width="38%"))
        controls = widgets.HBox([self.layer, self.sort, self.rank, self.feature])
        super().__init__([controls, self.header, self.figure, widgets.HBox([self.contexts, self.tokens])])
        self.add_class("cltlab-feature-browser")
        self._busy = False
        self._reorder()
        self.layer.observe(self._on_layer, "value")
        self.sort.observe(self._on_sort, "value")
        self.rank.observe(lambda change: self._on_pick(self._order[change.new]), "value")
        self.feature.observe(lambda change: self._on_pick(change.new), "value")
        self._select(self._order[0])

    def show(self, layer: int, feature: int) -> None:
        """Select and display ``feature`` of CLT ``layer`` (what a ReplacementComparison's feature links call)."""
        if not 0 <= layer < self.stats.n_layers or not 0 <= feature < self.stats.d_features:
            raise ValueError(f"No feature {feature} in layer {layer} of this CLT.")
        self._busy = True
        try:
            self.layer.value = layer
            self._reorder()
        finally:
            self._busy = False
        self._select(feature)

    # ------------------------------------------------------------------------------------------ controls

    def _reorder(self) -> None:
        self._order = self.stats.order(self.layer.value, self.sort.value)
        self._rank_of = {feature: rank for rank, feature in enumerate(self._order)}

    def _on_layer(self, change) -> None:
        if not self._busy:
            self._reorder()
            self._select(self.feature.value)

    def _on_sort(self, change) -> None:
        if not self._busy:
            self._reorder()
            self._select(self._order[0])  # the top feature by the new order

    def _on_pick(self, feature: int) -> None:
        if not self._busy:
            self._select(feature)

    def _select(self, feature: int) -> None:
        self._busy = True
        try:
            self.feature.value = feature
            self.rank.value = self._rank_of[feature]
        finally:
            self._busy = False
        self._render(self.layer.value, feature)

    # ------------------------------------------------------------------------------------------- drawing

    def _render(self, layer: int, feature: int) -> None:
        stats, offset = self.stats, self.stats.layer_offset
        frequency = stats.frequency[layer, feature].item()
        name = f"<b>layer {layer + offset} · feature {feature}</b>"
        if frequency == 0:
            self.header.value = (
                f'{name} — <span class="cltlab-dead" style="color:#c00"><b>dead</b></span>: it never fired on '
                f"{stats.n_tokens:,} tokens"
            )
        else:
            self.header.value = (
                f"{name} — density {frequency:.3%} ({round(frequency * stats.n_tokens):,} of "
                f"{stats.n_tokens:,} tokens) · max {stats.max_activation[layer, feature]:.3f} · "
                f"mean {stats.mean_activation[layer, feature]:.3f}"
            )
        self._draw_figure(layer, feature)
        self.contexts.value = self._contexts_html(layer, feature)
        effects = self._logit_effects(layer, feature)
        tok = self.model.tokenizer
        self.tokens.value = table(
            ["promotes", "logit", "suppresses", "logit"],
            [
                (code(token_text(tok, up)), f"{u:+.3g}", code(token_text(tok, down)), f"{d:+.3g}")
                for (up, u), (down, d) in zip(effects.promoted, effects.suppressed, strict=True)
            ],
            css_class="cltlab-token-effects",
        )

    def _logit_effects(self, layer: int, feature: int) -> TokenEffects:
        """The promoted and suppressed tokens: from the statistics where they hold them, else computed."""
        stats, n = self.stats, self.n_tokens
        if stats.top_logit_ids is None or stats.top_logit_ids.shape[-1] < n:
            return logit_effects(self.clt, self._unembedding, layer, feature, n=n)
        pairs = [
            list(zip(ids[layer, feature, :n].tolist(), values[layer, feature, :n].tolist(), strict=True))
            for ids, values in (
                (stats.top_logit_ids, stats.top_logit_values),
                (stats.bottom_logit_ids, stats.bottom_logit_values),
            )
        ]
        return TokenEffects(*pairs)

    def _draw_figure(self, layer: int, feature: int) -> None:
        stats, offset = self.stats, self.stats.layer_offset
        counts = stats.histogram[layer, feature]
        edges = stats.bin_edges
        nonzero = counts.nonzero().squeeze(1)
        lo, hi = (nonzero.min().item(), nonzero.max().item() + 1) if len(nonzero) else (0, 0)
        centers = (edges[:-1] * edges[1:]).sqrt()  # geometric bin centres
        norms = decoder_norms_by_target(self.clt, layer, feature)
        live = stats.frequency[layer][stats.frequency[layer] > 0].log10()
        density, density_edges = (
            torch.histogram(live, bins=30) if len(live) else (torch.zeros(0), torch.zeros(1))
        )
        mine = stats.frequency[layer, feature].item()
        with self.figure.batch_update():
            self.figure.data[0].x = centers[lo:hi].tolist()
            self.figure.data[0].y = counts[lo:hi].tolist()
            self.figure.data[1].x = [layer + offset + t for t in range(len(norms))]
            self.figure.data[1].y = norms.tolist()
            self.figure.data[2].x = ((density_edges[:-1] + density_edges[1:]) / 2).tolist()
            self.figure.data[2].y = density.tolist()
            top = max(density.tolist(), default=1)
            mark = [torch.tensor(mine).log10().item()] * 2 if mine > 0 else []
            self.figure.data[3].x = mark
            self.figure.data[3].y = [0, top] if mark else []
            self.figure.layout.title.text = f"layer {layer + offset} · feature {feature}" + (
                " (dead)" if mine == 0 else ""
            )

    def _contexts_html(self, layer: int, feature: int) -> str:
        stats = self.stats
        if (
            stats.context_ids is None
            or self.before > stats.before
            or self.after > stats.context_ids.shape[-1] - stats.before - 1
        ):
            return self._recomputed_contexts_html(layer, feature)
        vmax = stats.max_activation[layer, feature].item()
        rows = []
        for c in stored_contexts(stats, layer, feature)[: self.n_contexts]:
            start = max(0, c.index - self.before)  # the part of each window shown
            shown = slice(start, c.index + self.after + 1)
            texts = [token_text(self.model.tokenizer, t) for t in c.ids[shown]]
            rows.append(
                f"<tr><td>{c.activation:.3f}</td><td>"
                f"{shaded_tokens(texts, c.acts[shown], vmax, focus=c.index - start)}</td></tr>"
            )
        if not rows:
            return '<p class="cltlab-no-contexts"><i>No contexts: this feature never fired.</i></p>'
        head = "<tr><th>activation</th><th style='text-align:left'>context (shade = activation)</th></tr>"
        return f'<table class="cltlab-contexts">{head}{"".join(rows)}</table>'

    def _recomputed_contexts_html(self, layer: int, feature: int) -> str:
        """The contexts with their activations recomputed through the model (statistics without windows)."""
        top = self.stats.contexts(self.buffer, layer, feature, before=FULL_PREFIX, after=self.after)
        top = top[: self.n_contexts]
        if not top:
            return '<p class="cltlab-no-contexts"><i>No contexts: this feature never fired.</i></p>'
        width = max(len(c.ids) for c in top) + 1
        bos = self.model.bos_token_id
        ids = torch.full(
            (len(top), width), bos, dtype=torch.long
        )  # right padding never affects earlier tokens
        for j, c in enumerate(top):
            ids[j, 0] = bos
            ids[j, 1 : 1 + len(c.ids)] = torch.tensor(c.ids)
        acts = feature_activations(self.model, self.clt, ids, layer)[:, 1:, feature]  # (n, width - 1)
        vmax = self.stats.max_activation[layer, feature].item()
        rows = []
        for j, c in enumerate(top):
            start = max(0, c.index - self.before)
            window = c.ids[start : c.index + 1 + self.after]
            texts = [token_text(self.model.tokenizer, t) for t in window]
            values = acts[j, start : start + len(window)].tolist()
            rows.append(
                f"<tr><td>{c.activation:.3f}</td><td>"
                f"{shaded_tokens(texts, values, vmax, focus=c.index - start)}</td></tr>"
            )
        head = "<tr><th>activation</th><th style='text-align:left'>context (shade = activation)</th></tr>"
        return f'<table class="cltlab-contexts">{head}{"".join(rows)}</table>'


def _figure() -> go.FigureWidget:
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("activation histogram", "decoder norm per target layer", "layer density"),
    )
    fig.add_trace(go.Bar(name="activations", marker_color="#ff7f0e"), row=1, col=1)
    fig.add_trace(go.Bar(name="decoder norm", marker_color="#1f77b4"), row=1, col=2)
    fig.add_trace(go.Bar(name="features", marker_color="#aaaaaa"), row=1, col=3)
    fig.add_trace(go.Scatter(name="this feature", mode="lines", line_color="#d62728"), row=1, col=3)
    fig.update_xaxes(type="log", title_text="activation", row=1, col=1)
    fig.update_xaxes(title_text="target layer", dtick=1, row=1, col=2)
    fig.update_xaxes(title_text="log10 frequency", row=1, col=3)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    fig.update_layout(height=300, showlegend=False, margin=dict(t=60, b=40, l=50, r=20), bargap=0.05)
    return go.FigureWidget(fig)
