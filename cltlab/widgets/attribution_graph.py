"""AttributionGraphView: the pruned attribution graph of one prompt, drawn over its tokens and layers.

Each node sits in the cell of its token position (x) and layer (y): token embeddings on the bottom row, features
and error nodes at their layer (spread over the cell so they do not overlap), the logit nodes on the top row at the
last position. Edges are segments grouped into a few traces by sign and strength, so that thousands of them draw,
and redraw when a threshold moves, in one update.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import torch

from ..attribution import AttributionGraph, Intervention, InterventionResult, Node, intervene
from ..buffer import DiscBuffer
from ..clt import CrossLayerTranscoder
from ..features import FeatureStatistics
from ..html import code, readable, table, token_text
from ..models import LoadedModel
from .feature_browser import FeatureBrowser
from .snapshot import StaticCopy

KINDS = {"feature": "#ff7f0e", "error": "#7f7f7f", "token": "#2ca02c", "logit": "#9467bd"}
"""Node kinds, in the order of their traces, and their colours."""
SIGNS = {"positive": "31, 119, 180", "negative": "214, 39, 40"}
"""RGB of the edges by sign of their weight: blue positive, red negative."""
STRENGTHS = ((0.6, 0.2), (1.3, 0.4), (2.6, 0.7))
"""(width, opacity) of the weakest, middle and strongest third of the drawn edges of each sign."""
CELL = (0.8, 0.6)
"""Share of a cell's width and height that its nodes spread over."""
MAX_EDGES = 5000
"""At most this many edges are drawn (the strongest by |weight|); the score line says when more were kept."""
MAX_HOVER_FEATURES = 300
"""Top tokens are looked up for at most this many features per drawing (the most influential)."""
TOP_TOKENS = 6
"""How many of a feature's top activations its hover text lists the tokens of."""
TOP_EDGES = 5
"""Strongest inputs and outputs listed for the selected node."""
TOP_NEXT = 5
"""Next tokens compared before and after zeroing a feature."""


class AttributionGraphView(StaticCopy, widgets.VBox):
    """An attribution graph (``cltlab.attribute``), pruned and drawn; click a node to inspect it.

    Nodes: size by influence on the logits (logits by probability), colour by kind. Edges: blue positive, red
    negative, wider and darker the stronger. Hovering a feature shows its layer, position, index, activation and,
    given ``stats`` (with a ``buffer`` and ``model``), the tokens of its top activations in the buffer. Clicking a
    feature shows its strongest inputs and outputs and opens it in ``browser``. ``model``, ``clt``, ``stats`` and
    ``buffer`` default to the browser's.

    Attributes (the child widgets):
        node_threshold, edge_threshold: ``FloatSlider``s of ``graph.prune``; moving one re-prunes and redraws.
        scores: HTML line: replacement and completeness scores, nodes and edges drawn.
        figure: ``go.FigureWidget``: six edge traces (positive then negative, weakest to strongest), one node
            trace per kind of ``KINDS`` (its ``customdata`` holds the node indices), and a ring on the selection.
        details: HTML of the selected node: what it is, its strongest drawn inputs and outputs.
        zero: the "Zero feature" button (enabled for a selected feature when the model and CLT are given).
        intervention: HTML table of the next-token probabilities before and after zeroing.
        browser: the ``FeatureBrowser`` that feature clicks open (shown below), or None.
    Other attributes: ``graph``; ``pruned`` (the ``PruneResult`` drawn); ``drawn`` (kind → node indices, in the
    order of that kind's trace); ``positions`` (node index → (x, y)); ``centers`` (x of each token position's
    column); ``selected`` (a node index or None).
    """

    def __init__(
        self,
        graph: AttributionGraph,
        *,
        browser: FeatureBrowser | None = None,
        model: LoadedModel | None = None,
        clt: CrossLayerTranscoder | None = None,
        stats: FeatureStatistics | None = None,
        buffer: DiscBuffer | None = None,
        node_threshold: float = 0.8,
        edge_threshold: float = 0.98,
    ):
        self.graph, self.browser = graph, browser
        self.model = model if model is not None else getattr(browser, "model", None)
        self.clt = clt if clt is not None else getattr(browser, "clt", None)
        self.stats = stats if stats is not None else getattr(browser, "stats", None)
        self.buffer = buffer if buffer is not None else getattr(browser, "buffer", None)
        self.influence = graph.node_influence()  # (n_nodes,)
        self.graph_scores = graph.scores()
        self.selected: int | None = None
        self.positions: dict[int, tuple[float, float]] = {}
        self.centers: list[float] = [p + 0.5 for p in range(graph.n_pos)]
        self.width = float(graph.n_pos)
        self._top_tokens: dict[tuple[int, int], list[str]] = {}
        slider = dict(min=0.0, max=1.0, step=0.01, continuous_update=False, readout_format=".2f")
        style = {"description_width": "initial"}
        self.node_threshold = widgets.FloatSlider(
            node_threshold, description="node threshold", style=style, **slider
        )
        self.edge_threshold = widgets.FloatSlider(
            edge_threshold, description="edge threshold", style=style, **slider
        )
        self.scores = widgets.HTML()
        self.scores.add_class("cltlab-graph-scores")
        self.figure = _figure(graph)
        self.details = widgets.HTML("<i>Click a node to see it here.</i>", layout=widgets.Layout(width="55%"))
        self.details.add_class("cltlab-graph-details")
        self.zero = widgets.Button(
            description="Zero feature",
            disabled=True,
            tooltip="Set the selected feature to 0 and compare the next-token probabilities",
        )
        self.intervention = widgets.HTML(layout=widgets.Layout(width="45%"))
        children = [
            widgets.HBox([self.node_threshold, self.edge_threshold]),
            self.scores,
            self.figure,
            widgets.HBox([self.details, widgets.VBox([self.zero, self.intervention])]),
        ]
        super().__init__(children + ([browser] if browser is not None else []))
        self.add_class("cltlab-attribution-graph")
        for trace in self.figure.data:
            if trace.name in KINDS:
                trace.on_click(self._on_click)
        self.node_threshold.observe(lambda change: self.redraw(), "value")
        self.edge_threshold.observe(lambda change: self.redraw(), "value")
        self.zero.on_click(lambda _: self.zero_selected())
        self.redraw()

    # ------------------------------------------------------------------------------------------- actions

    def redraw(self) -> None:
        """Prune with the sliders' thresholds and draw what is kept."""
        graph = self.graph
        self.pruned = graph.prune(self.node_threshold.value, self.edge_threshold.value)
        kept = self.pruned.node_mask.nonzero().flatten().tolist()
        nodes = {index: graph.node(index) for index in kept}
        self.positions, self.centers, self.width = node_positions(nodes, self.influence, graph.n_pos)
        self.drawn = {kind: [i for i in kept if nodes[i].kind == kind] for kind in KINDS}
        targets, sources = self.pruned.edge_mask.nonzero(as_tuple=True)
        weights = graph.adjacency[targets, sources]
        n_edges = len(weights)
        if n_edges > MAX_EDGES:
            strongest = weights.abs().topk(MAX_EDGES).indices
            targets, sources, weights = targets[strongest], sources[strongest], weights[strongest]
        by_influence = sorted(self.drawn["feature"], key=lambda i: -float(self.influence[i]))
        with_tokens = set(by_influence[:MAX_HOVER_FEATURES])
        sizes = node_sizes(nodes, self.influence)
        segments = edge_segments(self.positions, targets, sources, weights)
        with self.figure.batch_update():
            for trace, (xs, ys) in zip(self.figure.data, segments, strict=False):
                trace.x, trace.y = xs, ys
            for trace in self.figure.data[len(segments) : len(segments) + len(KINDS)]:
                members = self.drawn[trace.name]
                trace.x = [self.positions[i][0] for i in members]
                trace.y = [self.positions[i][1] for i in members]
                trace.customdata = members
                trace.marker.size = [sizes[i] for i in members]
                trace.hovertext = [
                    "<br>".join(self.describe(i, top_tokens=i in with_tokens)) for i in members
                ]
            self._ring()
            self.figure.layout.xaxis.tickvals = self.centers
            self.figure.layout.xaxis.range = [-0.1, self.width + 0.1]
        shown = f" (the strongest {MAX_EDGES} drawn)" if n_edges > MAX_EDGES else ""
        n_features = len(self.drawn["feature"])
        self.scores.value = (
            f"replacement score <b>{self.graph_scores.replacement:.3f}</b> · completeness score "
            f"<b>{self.graph_scores.completeness:.3f}</b> · pruned to {len(kept)} of {graph.n_nodes} nodes "
            f"({n_features} of {graph.n_features} features) and {n_edges} edges{shown}"
        )

    def select(self, index: int) -> Node:
        """Select node ``index`` (what a click on it does): show it, and open a feature in the browser."""
        node = self.graph.node(index)
        self.selected = index
        self.details.value = self._details(index)
        self.zero.disabled = node.kind != "feature" or self.model is None or self.clt is None
        self.intervention.value = ""
        with self.figure.batch_update():
            self._ring()
        if node.kind == "feature" and self.browser is not None:
            self.browser.show(
                node.layer, node.feature
            )  # attribution covers every layer: CLT layer = model layer
        return node

    def zero_selected(self) -> InterventionResult:
        """Zero the selected feature at its position (what the button does) and tabulate the change."""
        node = None if self.selected is None else self.graph.node(self.selected)
        if node is None or node.kind != "feature":
            raise ValueError(
                "Select a feature node first: click one in the graph, or call select(node_index)."
            )
        if self.model is None or self.clt is None:
            raise ValueError(
                "Zeroing a feature runs the model: pass model= and clt= to AttributionGraphView."
            )
        change = Intervention(node.layer, node.position, node.feature, value=0.0)
        result = intervene(self.model, self.clt, self.graph.input_ids, [change])
        rows = [
            (code(readable(token)), f"{before:.4g}", f"{after:.4g}", f"{after - before:+.4g}")
            for token, before, after in result.top(self.model.tokenizer, TOP_NEXT)
        ]
        self.intervention.value = (
            f"<b>{html.escape(self.label(self.selected))} zeroed</b>: next-token probabilities"
            + table(["token", "before", "after", "change"], rows, css_class="cltlab-intervention")
        )
        return result

    # ------------------------------------------------------------------------------------------ describing

    def label(self, index: int) -> str:
        """A short name of node ``index``, e.g. ``L2 #17 @3``."""
        node, tokens = self.graph.node(index), self.graph.tokens
        if node.kind == "feature":
            return f"L{node.layer} #{node.feature} @{node.position}"
        if node.kind == "error":
            return f"error L{node.layer} @{node.position}"
        if node.kind == "token":
            return f"token {readable(tokens[node.position])!r} @{node.position}"
        return f"logit {readable(self.graph.logit_tokens[index - self.graph.logit_start])!r}"

    def describe(self, index: int, *, top_tokens: bool = True) -> list[str]:
        """Lines of (plotly-safe) HTML about node ``index``: the hover text, and the head of the details."""
        graph, node = self.graph, self.graph.node(index)
        influence = f"influence {float(self.influence[index]):.3g}"
        where = f"position {node.position} ({html.escape(repr(readable(graph.tokens[node.position])))})"
        if node.kind == "feature":
            lines = [
                f"<b>feature {node.feature}</b> · layer {node.layer} · {where}",
                f"activation {node.value:.3f} · {influence}",
            ]
            tokens = self.top_tokens(node.layer, node.feature) if top_tokens else None
            if tokens:
                counted = Counter(tokens)
                listed = [f"{t!r}" + (f" ×{counted[t]}" if counted[t] > 1 else "") for t in counted]
                lines.append("top tokens: " + html.escape(", ".join(listed)))
            return lines
        if node.kind == "error":
            return [f"<b>error</b> · layer {node.layer} · {where}", f"‖error‖ {node.value:.3f} · {influence}"]
        if node.kind == "token":
            return [f"<b>token</b> · {where}", influence]
        token = readable(graph.logit_tokens[index - graph.logit_start])
        return [f"<b>logit</b> {html.escape(repr(token))}", f"probability {node.value:.3g}"]

    def top_tokens(self, layer: int, feature: int) -> list[str] | None:
        """The tokens of the feature's top activations in the buffer (None without stats, buffer and model)."""
        if self.stats is None or self.buffer is None or self.model is None:
            return None
        if (layer, feature) not in self._top_tokens:
            contexts = self.stats.contexts(self.buffer, layer, feature, before=0, after=0)[:TOP_TOKENS]
            tokenizer = self.model.tokenizer
            self._top_tokens[layer, feature] = [token_text(tokenizer, c.ids[c.index]) for c in contexts]
        return self._top_tokens[layer, feature]

    def _details(self, index: int) -> str:
        mask, adjacency = self.pruned.edge_mask, self.graph.adjacency
        rows = []
        for direction, others, weights in (
            ("in", mask[index].nonzero().flatten(), adjacency[index]),  # sources of edges into it
            ("out", mask[:, index].nonzero().flatten(), adjacency[:, index]),
        ):
            strongest = others[weights[others].abs().argsort(descending=True)][:TOP_EDGES]
            rows += [(direction, self.label(i), f"{float(weights[i]):+.3g}") for i in strongest.tolist()]
        edges = table(["edge", "node", "weight"], rows, css_class="cltlab-node-edges") if rows else ""
        return f'<div class="cltlab-selected-node">{"<br>".join(self.describe(index))}</div>{edges}'

    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:  # plotly calls every trace's handler; only the clicked one has points
            self.select(self.drawn[trace.name][points.point_inds[0]])

    def _ring(self) -> None:
        ring = self.figure.data[-1]
        x, y = self.positions.get(self.selected, (None, None))
        ring.x, ring.y = ([x], [y]) if x is not None else ([], [])


def node_positions(
    nodes: dict[int, Node], influence: torch.Tensor, n_pos: int
) -> tuple[dict[int, tuple[float, float]], list[float], float]:
    """Where each node is drawn, the x of every token position's centre, and the width of all columns.

    y is the layer (tokens -1, logits n_layers); the nodes of one (position, layer) cell sit on a small grid
    around its centre, most influential first and the error node last. A position's column is wider the more
    nodes its fullest cell holds (as the square root), so crowded positions (usually the last) get room.
    """
    cells = defaultdict(list)
    for index, node in nodes.items():
        cells[node.position, node.layer].append(index)
    grids = {}
    for cell, members in cells.items():
        members.sort(key=lambda i: (nodes[i].kind == "error", -float(influence[i])))
        columns = max(1, math.ceil(math.sqrt(2 * len(members))))
        lines = math.ceil(len(members) / columns)
        grids[cell] = (math.ceil(len(members) / lines), lines)
    widths = [1.0] * n_pos
    for (position, _), (columns, _) in grids.items():
        widths[position] = max(widths[position], math.sqrt(columns / 2))
    centers = [sum(widths[:p]) + widths[p] / 2 for p in range(n_pos)]
    positions = {}
    for (position, row), members in cells.items():
        columns, lines = grids[position, row]
        for j, index in enumerate(members):
            line, column = divmod(j, columns)
            x = centers[position] + CELL[0] * widths[position] * ((column + 0.5) / columns - 0.5)
            y = row + CELL[1] * ((line + 0.5) / lines - 0.5)
            positions[index] = (x, y)
    return positions, centers, sum(widths)


def node_sizes(nodes: dict[int, Node], influence: torch.Tensor) -> dict[int, float]:
    """Marker sizes in pixels: by the square root of influence relative to the largest, logits by probability."""
    largest = max((float(influence[i]) for i, n in nodes.items() if n.kind != "logit"), default=0.0)
    sizes = {}
    for index, node in nodes.items():
        share = node.value if node.kind == "logit" else float(influence[index]) / max(largest, 1e-30)
        sizes[index] = 7 + 21 * math.sqrt(max(share, 0.0))
    return sizes


def edge_segments(
    positions: dict[int, tuple[float, float]],
    targets: torch.Tensor,
    sources: torch.Tensor,
    weights: torch.Tensor,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Line segments source → target as x and y arrays (NaN between segments, where plotly breaks the line), one
    pair per edge trace: by sign (``SIGNS``), then by third of |weight| among the drawn edges (``STRENGTHS``)."""
    n_nodes = max(positions, default=-1) + 1
    xy = np.full((n_nodes, 2), np.nan)
    for index, position in positions.items():
        xy[index] = position
    rank = weights.abs().argsort().argsort()  # 0 = weakest
    group = (weights <= 0).long() * len(STRENGTHS) + rank * len(STRENGTHS) // max(len(weights), 1)
    segments = []
    for g in range(len(SIGNS) * len(STRENGTHS)):
        at = (group == g).numpy()
        ends = np.stack([xy[sources.numpy()[at]], xy[targets.numpy()[at]], np.full((at.sum(), 2), np.nan)], 1)
        segments.append((ends[..., 0].ravel(), ends[..., 1].ravel()))  # (3 · n_edges,) each
    return segments


def _figure(graph: AttributionGraph) -> go.FigureWidget:
    fig = go.Figure()
    for sign, rgb in SIGNS.items():
        for i, (width, opacity) in enumerate(STRENGTHS):
            fig.add_trace(
                go.Scatter(
                    name=f"{sign} edge",
                    mode="lines",
                    line=dict(width=width, color=f"rgba({rgb},{opacity})"),
                    hoverinfo="skip",
                    legendgroup=sign,
                    showlegend=i == len(STRENGTHS) - 1,
                )
            )
    for kind, colour in KINDS.items():
        fig.add_trace(
            go.Scatter(
                name=kind,
                mode="markers",
                marker=dict(color=colour, line=dict(width=0.5, color="white")),
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    ring = dict(symbol="circle-open", size=30, color="black", line=dict(width=2))
    fig.add_trace(
        go.Scatter(name="selected", mode="markers", marker=ring, hoverinfo="skip", showlegend=False)
    )
    L, n_pos = graph.n_layers, graph.n_pos
    top = readable(graph.logit_tokens[0]) if graph.logit_tokens else ""
    p = float(graph.logit_probabilities[0]) if graph.logit_tokens else 0.0
    fig.update_layout(
        title=html.escape(f"{readable(graph.prompt)!r} → {top!r} (p {p:.2f})"),
        width=min(1100, 240 + 70 * n_pos),
        height=min(1000, 200 + 80 * (L + 2)),
        hovermode="closest",
        plot_bgcolor="white",
        margin=dict(t=60, b=60, l=60, r=20),
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
        xaxis=dict(
            tickvals=list(range(n_pos)),
            ticktext=[html.escape(readable(t)) for t in graph.tokens],
            range=[-0.6, n_pos - 0.4],
            showgrid=False,
            zeroline=False,
        ),
        yaxis=dict(
            title="layer",
            tickvals=list(range(-1, L + 1)),
            ticktext=["tokens", *map(str, range(L)), "logits"],
            range=[-1.6, L + 0.6],
            gridcolor="#eeeeee",
            zeroline=False,
        ),
    )
    return go.FigureWidget(fig)
