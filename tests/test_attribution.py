"""Attribution graphs on tiny-gpt2 (LayerNorm) and a tiny Llama (RMSNorm, grouped-query attention).

The local replacement model is affine in its sources (feature activations held fixed, error vectors, token
embeddings), so the tests check the graph against it directly: finite differences for single edges, and the sum of
a target's incoming edges plus its bias (the target's value with every source at zero) for whole rows.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_clt
from torch import nn

from cltlab import feature_effects
from cltlab.attribution import AttributionGraph, Intervention, LocalReplacement, attribute, intervene

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def clt_for(model, *, seed: int = 0, threshold: float = 0.5, cross_layer: bool = True):
    return make_clt(
        model.n_layers, model.d_model, 32, seed=seed, threshold_init=threshold, cross_layer=cross_layer
    )


def target_values(
    local: LocalReplacement,
    clt,
    graph: AttributionGraph,
    *,
    activations: torch.Tensor,
    error_scale: torch.Tensor,
    token_scale: torch.Tensor,
) -> torch.Tensor:
    """Every target of ``graph`` (selected features' pre-activations, then logit directions) in the frozen local
    model whose sources are: features held at ``activations`` ``(n_active,)``, error vector (layer, position)
    times ``error_scale`` ``(n_layers, n_pos)``, token embedding times ``token_scale`` ``(n_pos,)``."""
    prompt = local.prompt
    seq, L, _ = prompt.resid_mid.shape
    features = torch.zeros(seq, L, clt.d_features)
    layer, pos, feat = graph.active_features.T
    features[pos, layer, feat] = activations
    with torch.no_grad():
        recon_at_prompt = clt.decode(clt.encode(prompt.resid_mid) * (torch.arange(seq) > 0)[:, None, None])
        errors = prompt.mlp_out - recon_at_prompt  # (seq, n_layers, d_model)
        mlp = clt.decode(features) + errors * error_scale.T[:, :, None]
        mlp[0] = prompt.mlp_out[0]  # BOS: a constant of the local model
        resid, final = local.run(
            embeddings=prompt.embeddings[None] * token_scale[None, :, None],
            mlp_fn=lambda layer, _: mlp[None, :, layer],
        )
        pre = clt.preactivations(torch.stack(resid, 2)[0])  # (seq, n_layers, d_features)
    nodes = graph.active_features[graph.selected]
    feature_values = pre[nodes[:, 1], nodes[:, 0], nodes[:, 2]]
    unembedding = feature_effects.unembedding(local.model).float()
    directions = unembedding[graph.logit_ids] - unembedding.mean(0)
    return torch.cat([feature_values, directions @ final[0, -1]])


def prompt_sources(graph: AttributionGraph):
    return dict(
        activations=graph.activations.clone(),
        error_scale=torch.ones(graph.n_layers, graph.n_pos),
        token_scale=torch.ones(graph.n_pos),
    )


def target_rows(graph: AttributionGraph) -> torch.Tensor:
    """Rows of the adjacency that are targets: selected features, then logits."""
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_start, graph.n_nodes)])


@pytest.fixture(scope="module")
def traced(model):
    """One graph per model, shared by the tests (they only read it)."""
    clt = clt_for(model)
    graph = attribute(model, clt, PROMPT, batch_size=16, progress=False)
    local = LocalReplacement(model, graph.input_ids)
    return model, clt, graph, local


def test_graph_layout(traced):
    model, clt, graph, _ = traced
    n_active = len(graph.active_features)
    assert n_active > 20 and graph.n_features == n_active  # no cap: every active feature is a node
    assert (graph.active_features[:, 1] > 0).all()  # nothing at BOS
    keys = graph.active_features.double() @ torch.tensor([1e6, 1e3, 1.0]).double()
    assert (keys.diff() > 0).all()  # ordered by (layer, position, feature), circuit-tracer's order
    assert graph.n_nodes == n_active + model.n_layers * graph.n_pos + graph.n_pos + graph.n_logits
    assert graph.input_ids[0] == model.bos_token_id
    assert graph.error_norms[:, 0].abs().max() == 0  # BOS errors are zero
    # Logits: most likely first, cumulative probability reaches 0.95 only at the last one (or 10 of them).
    p = graph.logit_probabilities
    assert (p.diff() <= 0).all() and 1 <= graph.n_logits <= 10
    assert p.sum() >= 0.95 or graph.n_logits == 10
    assert p[:-1].sum() < 0.95
    # No edges into errors or tokens, none out of logits, none from a feature to a feature of its own layer or earlier.
    assert graph.adjacency[graph.error_start : graph.logit_start].abs().max() == 0
    assert graph.adjacency[:, graph.logit_start :].abs().max() == 0
    layers = graph.active_features[graph.selected, 0]
    later = layers[:, None] <= layers[None, :]  # target layer <= source layer
    assert graph.adjacency[: graph.n_features, : graph.n_features][later].abs().max() == 0


def test_completeness_identity(traced):
    """Each target's incoming edges plus its bias (its value with every source at zero) give its value."""
    model, clt, graph, local = traced
    values = target_values(local, clt, graph, **prompt_sources(graph))
    bias = target_values(
        local,
        clt,
        graph,
        activations=torch.zeros_like(graph.activations),
        error_scale=torch.zeros(graph.n_layers, graph.n_pos),
        token_scale=torch.zeros(graph.n_pos),
    )
    incoming = graph.adjacency[target_rows(graph)].sum(1)
    scale = values.abs().max()
    assert torch.allclose(incoming + bias, values, rtol=0, atol=1e-4 * scale)
    # The local model on the prompt is the original model: the logit directions match the real logits.
    logits = local.prompt.logits
    unembedding = feature_effects.unembedding(local.model).float()
    expected = logits[graph.logit_ids] - (unembedding.mean(0) @ local.prompt.final[-1])
    assert torch.allclose(values[graph.n_features :], expected, atol=1e-4)


def test_edges_match_finite_differences(traced):
    """Changing one source by δ changes each target by edge × δ / activation (1 for error and token nodes)."""
    model, clt, graph, local = traced
    base = target_values(local, clt, graph, **prompt_sources(graph))
    rows = target_rows(graph)
    generator = torch.Generator().manual_seed(0)
    writers = (graph.adjacency[:, : graph.n_features].abs().amax(0) > 0).nonzero().flatten()
    features = writers[torch.randperm(len(writers), generator=generator)[:4]].tolist()
    positions = torch.randint(1, graph.n_pos, (2,), generator=generator).tolist()
    cases = [("feature", f) for f in features]
    cases += [
        ("error", (int(torch.randint(0, graph.n_layers, (1,), generator=generator)), p)) for p in positions
    ]
    cases += [("token", p) for p in positions]
    delta = 0.5
    for kind, where in cases:
        sources = prompt_sources(graph)
        if kind == "feature":
            node = where
            activation = float(graph.activations[graph.selected[where]])
            sources["activations"][graph.selected[where]] += delta * activation
        elif kind == "error":
            node = graph.error_node(*where)
            sources["error_scale"][where] += delta
        else:
            node = graph.token_node(where)
            sources["token_scale"][where] += delta
        changed = target_values(local, clt, graph, **sources) - base
        predicted = graph.adjacency[rows, node] * delta
        assert torch.allclose(changed, predicted, rtol=0, atol=1e-4 * max(1.0, base.abs().max())), (
            kind,
            where,
        )
        if kind != "error":
            assert predicted.abs().max() > 1e-4  # the check is not vacuous


def test_max_features_keeps_the_most_influential(tiny_gpt2):
    clt = clt_for(tiny_gpt2)
    full = attribute(tiny_gpt2, clt, PROMPT, progress=False)
    capped = attribute(
        tiny_gpt2, clt, PROMPT, max_features=10, batch_size=4, update_interval=1, progress=False
    )
    assert capped.n_features == 10 and len(capped.active_features) == len(full.active_features)
    # Rows of the kept features equal those of the full graph, on the columns both keep.
    keep_columns = torch.cat([capped.selected, torch.arange(full.n_features, full.logit_start)])
    assert torch.allclose(
        capped.adjacency[:10, : capped.logit_start],
        full.adjacency[capped.selected][:, keep_columns],
        atol=1e-5,
    )
    # The kept features are among the most influential of the full graph.
    influence = full.node_influence()[: full.n_features]
    top = set(influence.argsort(descending=True)[:20].tolist())
    assert len(top & set(capped.selected.tolist())) >= 7


def test_zero_error_gives_replacement_score_one(tiny_gpt2):
    """A model whose MLPs *are* the CLT has no reconstruction error: every path from tokens avoids error nodes."""
    clt = clt_for(tiny_gpt2, seed=3)
    model = exact_model(tiny_gpt2, clt)
    graph = attribute(model, clt, PROMPT, progress=False)
    assert graph.error_norms.max() < 1e-4
    replacement, completeness = graph.scores()
    assert replacement > 1 - 1e-4 and completeness > 1 - 1e-4
    # The random CLT on the real model does leave errors, and its score shows them.
    assert attribute(tiny_gpt2, clt, PROMPT, progress=False).scores().replacement < 0.9


def exact_model(model, clt):
    """A copy of ``model`` whose MLP blocks compute exactly the CLT's reconstruction from ``resid_mid``."""
    import copy

    exact = copy.deepcopy(model)
    state: dict[int, torch.Tensor] = {}

    class CLTLayer(nn.Module):
        def __init__(self, layer: int):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            if self.layer == 0:
                state.clear()
            state[self.layer] = clt.encode_layer(x.float(), self.layer)
            features = torch.stack(
                [state.get(i, torch.zeros_like(state[self.layer])) for i in range(clt.n_layers)], -2
            )
            return clt.decode_layer(features, self.layer).to(x.dtype)

    for layer in range(model.n_layers):
        block = exact.blocks()[layer]
        setattr(block, model.sites.pre_mlp_norm, nn.Identity())  # the CLT reads resid_mid itself
        setattr(block, model.sites.mlp, CLTLayer(layer))
    return exact


def test_prune_keeps_the_asked_share(traced):
    _, _, graph, _ = traced
    node_influence = graph.node_influence()
    for node_threshold, edge_threshold in [(0.8, 0.98), (0.5, 0.9)]:
        result = graph.prune(node_threshold, edge_threshold)
        kept = node_influence[result.node_mask].sum() / node_influence.sum()
        assert kept >= node_threshold - 1e-6
        assert result.node_mask[graph.token_start :].all()
        assert (
            not result.edge_mask[~result.node_mask].any() and not result.edge_mask[:, ~result.node_mask].any()
        )
        assert result.node_mask.sum() < graph.n_nodes
    looser, tighter = graph.prune(0.9, 0.99), graph.prune(0.5, 0.9)
    assert tighter.node_mask.sum() <= looser.node_mask.sum()
    with pytest.raises(ValueError, match="node_threshold must be between 0 and 1"):
        graph.prune(1.5)


def test_interventions_follow_the_graph(traced):
    model, clt, graph, local = traced
    unembedding = feature_effects.unembedding(local.model).float()
    directions = unembedding[graph.logit_ids] - unembedding.mean(0)

    # No intervention: the original logits, frozen or free.
    for frozen in (True, False):
        same = intervene(model, clt, PROMPT, [], freeze_attention=frozen, local=local)
        assert torch.allclose(same.logits, same.original_logits, atol=1e-4)
    influence = graph.node_influence()[: graph.n_features]
    node = int(influence.argmax())
    layer, position, feature = graph.active_features[graph.selected[node]].tolist()
    activation = float(graph.activations[graph.selected[node]])
    delta = 1e-3 * activation
    direct_edges = graph.adjacency[graph.logit_start :, node]
    # Features held: the change in each logit direction is its direct edge × δ / a, exactly.
    held = intervene(
        model,
        clt,
        PROMPT,
        [Intervention(layer, position, feature, value=activation + delta)],
        hold_features=True,
        local=local,
    )
    change = logit_directions(held, graph, directions)
    assert torch.allclose(change, direct_edges * delta / activation, rtol=1e-2, atol=1e-6)
    # Features free (frozen attention): to first order, the direct edge plus every path through features.
    free = intervene(
        model, clt, PROMPT, [Intervention(layer, position, feature, scale=1 + 1e-3)], local=local
    )
    expected = total_effect(graph, node) * delta / activation
    assert torch.allclose(logit_directions(free, graph, directions), expected, rtol=2e-2, atol=1e-5)
    # Zeroing the most influential feature moves the distribution.
    zeroed = intervene(model, clt, PROMPT, [Intervention(layer, position, feature, value=0.0)], local=local)
    assert (zeroed.probabilities - zeroed.original_probabilities).abs().max() > 1e-4
    rows = zeroed.top(model.tokenizer, 3)
    assert len(rows) >= 3 and all(isinstance(r[0], str) for r in rows)


def logit_directions(result, graph, directions):
    """Change of each logit node's value (its logit minus the mean logit) between the two runs."""
    diff = result.logits - result.original_logits
    return diff[graph.logit_ids] - diff.mean()


def total_effect(graph: AttributionGraph, node: int) -> torch.Tensor:
    """Σ over paths through active features of the edges' products, per logit, for a unit relative change."""
    n = graph.n_features
    a = graph.activations[graph.selected]
    derivative = graph.adjacency[:n, :n] / a[None, :]  # ∂ pre-activation of target / ∂ activation of source
    change = torch.zeros(n)
    change[node] = a[node]
    for _ in range(graph.n_layers + 1):
        change = derivative @ change
        change[node] = a[node]
    return (graph.adjacency[graph.logit_start :, :n] / a[None, :]) @ change


def test_bad_input_is_refused(tiny_gpt2, tiny_llama):
    clt = clt_for(tiny_gpt2)
    with pytest.raises(ValueError, match="prompt is empty"):
        attribute(tiny_gpt2, clt, "   ", progress=False)
    with pytest.raises(ValueError, match="reads at most 256"):
        attribute(tiny_gpt2, clt, "word " * 300, progress=False)
    with pytest.raises(ValueError, match="needs every layer"):
        attribute(tiny_llama, clt, PROMPT, progress=False)
    narrow = make_clt(tiny_gpt2.n_layers, 32, 8)
    with pytest.raises(ValueError, match="d_model 32"):
        attribute(tiny_gpt2, narrow, PROMPT, progress=False)
    offset = make_clt(3, tiny_gpt2.d_model, 8, layer_offset=1)
    with pytest.raises(ValueError, match="layers 1–3"):
        attribute(tiny_gpt2, offset, PROMPT, progress=False)
    with pytest.raises(ValueError, match="outside the CLT and prompt"):
        intervene(tiny_gpt2, clt, PROMPT, [Intervention(0, 0, 1, value=0.0)])


def test_no_active_features_gives_tokens_errors_and_logits(tiny_gpt2):
    silent = clt_for(tiny_gpt2, threshold=1e6)
    graph = attribute(tiny_gpt2, silent, PROMPT, progress=False)
    assert graph.n_features == 0 and len(graph.active_features) == 0
    assert graph.n_nodes == tiny_gpt2.n_layers * graph.n_pos + graph.n_pos + graph.n_logits
    replacement, completeness = graph.scores()
    # With no features, the influence reaches the logits directly from tokens or errors: the score is the
    # probability-weighted share of the logits' normalized input from tokens.
    logit_rows = graph.adjacency[graph.logit_start :].abs()
    token_share = logit_rows[:, graph.token_start : graph.logit_start].sum(1) / logit_rows.sum(1)
    p = graph.logit_probabilities
    assert replacement == pytest.approx(float((p * token_share).sum() / p.sum()), rel=1e-4)
    assert 0 < replacement < 1
    assert graph.prune().node_mask[graph.token_start :].all()


def test_save_load_round_trip(traced, tmp_path):
    _, _, graph, _ = traced
    graph.save(tmp_path / "g")
    loaded = AttributionGraph.load(tmp_path / "g")
    assert torch.equal(loaded.adjacency, graph.adjacency) and loaded.tokens == graph.tokens
    assert loaded.scores() == graph.scores() and loaded.nodes() == graph.nodes()
    (tmp_path / "g" / "graph.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a 'cltlab.attribution_graph' file"):
        AttributionGraph.load(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="not a saved attribution graph"):
        AttributionGraph.load(tmp_path / "missing")


# The fields of circuit-tracer 0.5.0's frontend models (frontend/graph_models.py).
CT_NODE_FIELDS = {
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
    "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation",
}  # fmt: skip
CT_METADATA_FIELDS = {
    "slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version",
}  # fmt: skip


def test_circuit_tracer_graph_file(traced, tmp_path):
    import json

    _, _, graph, _ = traced
    path = graph.export_graph_files(tmp_path / "graphs", "capital-test")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert set(data["metadata"]) == CT_METADATA_FIELDS and data["metadata"]["scan"] == graph.scan
    assert data["metadata"]["prompt_tokens"] == graph.tokens
    pruned = graph.prune()
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(set(n) == CT_NODE_FIELDS for n in data["nodes"])
    assert len(ids) == len(data["nodes"]) <= int(pruned.node_mask.sum())
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    # Every link joins two listed nodes and carries the adjacency's weight.
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert len(data["links"]) > 0 and all(e["source"] in ids and e["target"] in ids for e in data["links"])
    link = data["links"][0]
    source, target = by_id[link["source"]], by_id[link["target"]]
    if source["feature_type"] == "embedding":
        column = graph.token_node(source["ctx_idx"])
    elif source["feature_type"] == "mlp reconstruction error":
        column = graph.error_node(int(source["layer"]), source["ctx_idx"])
    else:
        layer, feature, pos = map(int, source["node_id"].split("_"))
        column = graph.feature_node(layer, pos, feature)
    if target["feature_type"] == "logit":
        row = graph.logit_start + graph.logit_ids.tolist().index(target["feature"])
    else:
        layer, feature, pos = map(int, target["node_id"].split("_"))
        row = graph.feature_node(layer, pos, feature)
    assert link["weight"] == pytest.approx(float(graph.adjacency[row, column]))
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and len(logits) == graph.n_logits
    # A second graph joins the index; the same slug replaces its entry.
    graph.export_graph_files(tmp_path / "graphs", "second")
    graph.export_graph_files(tmp_path / "graphs", "second")
    index = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["capital-test", "second"]
    with pytest.raises(ValueError, match="slug '../x'"):
        graph.export_graph_files(tmp_path / "graphs", "../x")
