"""Write a pruned graph as circuit-tracer's graph file, the JSON its local frontend and Neuronpedia's read.

The format is circuit-tracer 0.5.0's ``utils/create_graph_files.py`` (models in ``frontend/graph_models.py``):
``<out>/<slug>.json`` with ``metadata``, ``qParams``, ``nodes`` and ``links``, and the slug's entry in
``<out>/graph-metadata.json`` (other graphs' entries are kept). Node ids follow circuit-tracer: features
``{layer}_{feature}_{pos}``, errors ``0_{layer}_{pos}``, tokens ``E_{token id}_{pos}``, logits
``{n_layers + 1}_{token id}_{pos}``; a feature's ``feature`` field is the Cantor pairing of (layer, feature), and
``influence`` is the node's cumulative share of influence.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from .graph import AttributionGraph

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def cantor(x: int, y: int) -> int:
    """Circuit-tracer's unique integer for a (layer, feature) pair."""
    return (x + y) * (x + y + 1) // 2 + y


def _process_token(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _node(graph: AttributionGraph, index: int, influence: float) -> dict:
    node = graph.node(index)
    base = dict(
        token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="", activation=None
    )
    if node.kind == "feature":
        return base | dict(
            node_id=f"{node.layer}_{node.feature}_{node.position}",
            feature=cantor(node.layer, node.feature),
            layer=str(node.layer),
            ctx_idx=node.position,
            feature_type="cross layer transcoder",
            jsNodeId=f"{node.layer}_{node.feature}-0",
            influence=influence,
            activation=node.value,
        )
    if node.kind == "error":
        return base | dict(
            node_id=f"0_{node.layer}_{node.position}",
            feature=-1,
            layer=str(node.layer),
            ctx_idx=node.position,
            feature_type="mlp reconstruction error",
            jsNodeId=f"{node.layer}_{node.position}-0",
            influence=influence,
        )
    if node.kind == "token":
        return base | dict(
            node_id=f"E_{node.feature}_{node.position}",
            feature=node.position,
            layer="E",
            ctx_idx=node.position,
            feature_type="embedding",
            jsNodeId=f"E_{node.feature}-{node.position}",
            influence=influence,
        )
    rank = index - graph.logit_start
    layer = str(graph.n_layers + 1)
    token = graph.logit_tokens[rank]
    return base | dict(
        node_id=f"{layer}_{node.feature}_{node.position}",
        feature=node.feature,
        layer=layer,
        ctx_idx=node.position,
        feature_type="logit",
        token_prob=node.value,
        is_target_logit=rank == 0,
        jsNodeId=f"L_{node.feature}-{node.position}",
        clerp=f'Output "{token}" (p={node.value:.3f})',
        influence=None,
    )


def _write_json(path: Path, data) -> None:
    """Write JSON through a unique temporary file and a rename, so a reader never sees half a file."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def export_graph_files(
    graph: AttributionGraph,
    out_dir: str | Path,
    slug: str,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Path:
    """Prune ``graph`` and write ``<out_dir>/<slug>.json`` plus its entry in ``graph-metadata.json``."""
    if not SLUG.match(slug):
        raise ValueError(f"slug {slug!r} must be letters, digits, '.', '_' or '-' (it names a file).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = graph.prune(node_threshold, edge_threshold)
    indices = pruned.node_mask.nonzero().flatten().tolist()
    nodes = {i: _node(graph, i, float(pruned.cumulative_influence[i])) for i in indices}
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
        for s, t, w in zip(sources.tolist(), targets.tolist(), weights, strict=True)
        if s in nodes and t in nodes
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [
        n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")
    ]
    metadata = {
        "slug": slug,
        "scan": graph.scan,
        "transcoder_list": [],
        "prompt_tokens": [_process_token(t) for t in graph.tokens],
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    path = out_dir / f"{slug}.json"
    _write_json(path, {"metadata": metadata, "qParams": q_params, "nodes": used, "links": links})
    index_path = out_dir / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [metadata]
    _write_json(index_path, index)
    return path
