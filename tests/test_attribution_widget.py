"""The AttributionGraphView driven from code as clicks would drive it (no browser): it draws exactly the pruned
graph where the layout says, its sliders re-prune, a click opens the feature in a FeatureBrowser, and the "Zero
feature" button reports what ``cltlab.intervene`` computes."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest
from helpers import make_clt

import cltlab
from cltlab import AttributionGraphView, DiscBuffer, FeatureBrowser, Intervention, feature_statistics
from cltlab.widgets.attribution_graph import KINDS, STRENGTHS

PROMPT = "To be, or not to be, that is the"


@pytest.fixture(scope="module")
def clt(tiny_gpt2):
    return make_clt(tiny_gpt2.n_layers, tiny_gpt2.d_model, 32, threshold_init=0.5)


@pytest.fixture(scope="module")
def graph(tiny_gpt2, clt):
    return cltlab.attribute(tiny_gpt2, clt, PROMPT, progress=False)


@pytest.fixture(scope="module")
def buffer(buffer_path):
    return DiscBuffer(buffer_path, batch_size=100)


@pytest.fixture(scope="module")
def stats(clt, buffer):
    return feature_statistics(clt, buffer, k=4, progress=False)


@pytest.fixture
def browser(stats, clt, tiny_gpt2, buffer):
    return FeatureBrowser(stats, clt, tiny_gpt2, buffer, n_contexts=2, before=4, after=2)


@pytest.fixture
def view(graph, tiny_gpt2, clt):
    return AttributionGraphView(graph, model=tiny_gpt2, clt=clt)


def node_traces(view) -> dict:
    return {trace.name: trace for trace in view.figure.data if trace.name in KINDS}


def drawn_nodes(view) -> list[int]:
    return [i for trace in node_traces(view).values() for i in trace.customdata]


def drawn_edges(view) -> set[tuple]:
    """(x0, y0, x1, y1, sign) of every segment of the edge traces."""
    edges = set()
    for trace in view.figure.data[: 2 * len(STRENGTHS)]:
        ends = np.stack([np.asarray(trace.x, dtype=float), np.asarray(trace.y, dtype=float)], 1).reshape(
            -1, 3, 2
        )
        assert np.isnan(ends[:, 2]).all()  # a gap after each segment
        sign = 1 if trace.name == "positive edge" else -1
        edges |= {(*(round(v, 6) for v in e[:2].ravel()), sign) for e in ends}
    return edges


def test_draws_the_pruned_nodes_once_each(view, graph):
    pruned = graph.prune(0.8, 0.98)
    drawn = drawn_nodes(view)
    assert len(drawn) == len(set(drawn)) == int(pruned.node_mask.sum()) < graph.n_nodes
    assert sorted(drawn) == pruned.node_mask.nonzero().flatten().tolist()
    for kind, trace in node_traces(view).items():
        assert trace.customdata and all(graph.node(i).kind == kind for i in trace.customdata)
        assert len(trace.x) == len(trace.y) == len(trace.marker.size) == len(trace.hovertext)


def test_layout_tokens_at_the_bottom_logits_on_top_the_rest_in_their_cell(view, graph):
    traces = node_traces(view)
    tokens, logits = traces["token"], traces["logit"]
    centers = view.centers  # a column per position, left to right, wider where more nodes share a cell
    steps = [b - a for a, b in zip(centers[:-1], centers[1:], strict=True)]
    assert len(centers) == graph.n_pos and min(steps) > 0
    assert steps[-1] > steps[0]  # the last position, where most nodes of this graph sit, is widest
    assert list(view.figure.layout.xaxis.tickvals) == centers
    assert list(tokens.x) == centers and set(tokens.y) == {-1}
    assert all(abs(x - centers[-1]) < centers[-1] - centers[-2] for x in logits.x)
    assert all(abs(y - graph.n_layers) < 0.5 for y in logits.y) and len(logits.x) == graph.n_logits
    for kind in ("feature", "error"):
        trace = traces[kind]
        for index, x, y in zip(trace.customdata, trace.x, trace.y, strict=True):
            node = graph.node(index)
            left = 0.0 if node.position == 0 else (centers[node.position - 1] + centers[node.position]) / 2
            right = (
                view.width
                if node.position == graph.n_pos - 1
                else (centers[node.position] + centers[node.position + 1]) / 2
            )
            assert left < x < right and abs(y - node.layer) < 0.5
    points = [(x, y) for t in traces.values() for x, y in zip(t.x, t.y, strict=True)]
    assert len(set(points)) == len(points)  # nodes sharing a cell are spread apart
    labels = list(view.figure.layout.xaxis.ticktext)
    assert labels[1:] == [html.escape(t) for t in graph.tokens[1:]]
    assert list(view.figure.layout.yaxis.ticktext) == ["tokens", "0", "1", "2", "3", "logits"]


def test_edges_join_the_drawn_nodes_by_sign(view, graph):
    pruned = view.pruned
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    expected = set()
    for t, s in zip(targets.tolist(), sources.tolist(), strict=True):
        sign = 1 if graph.adjacency[t, s] > 0 else -1
        expected.add((*(round(v, 6) for v in (*view.positions[s], *view.positions[t])), sign))
    assert len(targets) > 50 and drawn_edges(view) == expected
    assert f"and {len(targets)} edges" in view.scores.value


def test_node_size_follows_influence(view, graph):
    features = node_traces(view)["feature"]
    influence = graph.node_influence()[list(features.customdata)]
    sizes = np.asarray(features.marker.size)
    assert sizes[influence.argmax().item()] == max(sizes) and sizes.min() >= 7


def test_sliders_re_prune_and_redraw(view, graph):
    before = len(drawn_nodes(view))
    view.node_threshold.value = 0.5
    fewer = len(drawn_nodes(view))
    assert fewer == int(graph.prune(0.5, 0.98).node_mask.sum()) < before
    view.node_threshold.value = 1.0
    view.edge_threshold.value = 1.0
    assert len(drawn_nodes(view)) == int(graph.prune(1.0, 1.0).node_mask.sum()) > before
    assert f"pruned to {len(drawn_nodes(view))} of {graph.n_nodes} nodes" in view.scores.value


def test_score_line_shows_both_scores(view, graph):
    scores = graph.scores()
    assert f"replacement score <b>{scores.replacement:.3f}</b>" in view.scores.value
    assert f"completeness score <b>{scores.completeness:.3f}</b>" in view.scores.value


def test_selecting_a_feature_opens_it_in_the_browser(graph, tiny_gpt2, clt, stats, browser):
    view = AttributionGraphView(graph, browser=browser, model=tiny_gpt2, clt=clt, stats=stats)
    assert view.children[-1] is browser
    features = view.drawn["feature"]
    index = next(
        i for i in features if (graph.node(i).layer, graph.node(i).feature) != (0, browser.feature.value)
    )
    node = view.select(index)
    assert (browser.layer.value, browser.feature.value) == (node.layer, node.feature)
    assert f"layer {node.layer} · feature {node.feature}" in browser.header.value
    assert (
        f"<b>feature {node.feature}</b> · layer {node.layer} · position {node.position}" in view.details.value
    )
    assert "cltlab-node-edges" in view.details.value and not view.zero.disabled
    ring = view.figure.data[-1]
    assert (ring.x[0], ring.y[0]) == view.positions[index]


def test_a_plotly_click_selects_the_node(view, graph):
    """The message the page sends when a marker is clicked, as plotly's widget receives it."""
    trace_index = next(i for i, t in enumerate(view.figure.data) if t.name == "error")
    view.figure._js2py_pointsCallback = {
        "event_type": "plotly_click",
        "points": {"trace_indexes": [trace_index], "point_indexes": [2], "xs": [0], "ys": [0]},
        "device_state": None,
        "selector": None,
    }
    index = view.drawn["error"][2]
    assert view.selected == index
    node = graph.node(index)
    assert f"<b>error</b> · layer {node.layer}" in view.details.value
    assert view.zero.disabled  # only features can be zeroed


def test_zero_feature_reports_what_intervene_computes(view, graph, tiny_gpt2, clt):
    index = max(view.drawn["feature"], key=lambda i: float(view.influence[i]))
    view.select(index)
    node = graph.node(index)
    view.zero.click()
    expected = cltlab.intervene(
        tiny_gpt2, clt, graph.input_ids, [Intervention(node.layer, node.position, node.feature, value=0.0)]
    ).top(tiny_gpt2.tokenizer, 5)
    rows = re.findall(r"<tr>(.*?)</tr>", view.intervention.value)[1:]  # after the header
    assert len(rows) == len(expected) >= 5
    for row, (token, before, after) in zip(rows, expected, strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert html.unescape(re.sub(r"<[^>]+>", "", cells[0])) == token
        assert float(cells[1]) == pytest.approx(before, rel=1e-3)
        assert float(cells[2]) == pytest.approx(after, rel=1e-3)
    assert f"L{node.layer} #{node.feature} @{node.position} zeroed" in view.intervention.value


def test_zero_needs_a_feature_and_the_model(graph, view):
    with pytest.raises(ValueError, match="Select a feature node first"):
        view.zero_selected()
    bare = AttributionGraphView(graph)
    bare.select(bare.drawn["feature"][0])
    assert bare.zero.disabled
    with pytest.raises(ValueError, match="pass model= and clt="):
        bare.zero_selected()


def test_hover_text_lists_the_top_tokens_of_each_feature(graph, tiny_gpt2, clt, stats, buffer):
    view = AttributionGraphView(graph, model=tiny_gpt2, clt=clt, stats=stats, buffer=buffer)
    features = node_traces(view)["feature"]
    checked = 0
    for index, text in zip(features.customdata, features.hovertext, strict=True):
        node = graph.node(index)
        assert f"activation {node.value:.3f}" in text and f"feature {node.feature}" in text
        rows = [r for r in stats.top_rows[node.layer, node.feature].tolist() if r >= 0]
        if not rows:
            assert "top tokens" not in text
            continue
        tokens = [tiny_gpt2.tokenizer.decode([int(buffer.token_info(r, r + 1)[0][0])]) for r in rows]
        for token in tokens:
            assert html.escape(repr(token.replace("\n", "⏎"))) in text
        checked += 1
    assert checked > 0
    plain = node_traces(AttributionGraphView(graph))["feature"].hovertext
    assert not any("top tokens" in text for text in plain)


def test_logits_are_sized_by_probability(view, graph):
    logits = node_traces(view)["logit"]
    p = graph.logit_probabilities[[i - graph.logit_start for i in logits.customdata]]
    assert list(logits.marker.size) == pytest.approx([7 + 21 * math.sqrt(v) for v in p.tolist()])
