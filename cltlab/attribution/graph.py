"""The attribution graph of one prompt: its nodes, its edges, their influence, pruning and the paper's two scores.

Nodes are ordered as in circuit-tracer's adjacency matrix: the selected feature nodes (sorted by layer, position,
feature), one error node per (layer, position) — layer-major —, one token node per position, then the logit nodes
(most likely first). ``adjacency[target, source]`` is the direct effect of the source on the target in the local
replacement model: a feature's edge is scaled by its activation (the effect of the feature *as active on this
prompt*); error and token nodes carry their whole vector.

Influence (paper, "Pruning"): with ``Â`` the adjacency in absolute value, each row normalized to sum to one, the
influence of every node on the logits is ``w (Â + Â² + …)``, where ``w`` holds the logit probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

FORMAT = "cltlab.attribution_graph"
FORMAT_VERSION = 1


class Node(NamedTuple):
    """One node of a graph, as the widget and the exports describe it."""

    kind: str
    """``feature``, ``error``, ``token`` or ``logit``."""
    layer: int
    """Model layer (features and errors); -1 for tokens, ``n_layers`` for logits."""
    position: int
    """Token position; the last position for logits."""
    feature: int
    """Feature index (features), token id (tokens and logits), -1 for errors."""
    value: float
    """Activation (features), ‖error‖ (errors), 1 (tokens), probability (logits)."""


class PruneResult(NamedTuple):
    """What ``AttributionGraph.prune`` keeps."""

    node_mask: torch.Tensor
    """``(n_nodes,)`` bool."""
    edge_mask: torch.Tensor
    """``(n_nodes, n_nodes)`` bool, rows targets and columns sources as in ``adjacency``."""
    cumulative_influence: torch.Tensor
    """``(n_nodes,)`` each node's share of the total influence when nodes are taken by decreasing influence."""


class GraphScores(NamedTuple):
    """The paper's two measures of how much of the computation the features explain."""

    replacement: float
    """Share of the token → logit influence that does not pass through error nodes."""
    completeness: float
    """Influence-weighted share of the nodes' inputs that come from features and tokens rather than errors."""


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """|A| with every row divided by its sum (rows with no input stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp_min(1e-10)


def influence(matrix: torch.Tensor, weights: torch.Tensor, *, max_iter: int = 1000) -> torch.Tensor:
    """``weights (A + A² + …)`` for a nilpotent ``A`` (a graph with no cycles), by repeated products."""
    current = weights @ matrix
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ matrix
        total += current
    raise RuntimeError(f"Influence did not converge in {max_iter} steps: the graph has a cycle.")


def cumulative_threshold(scores: torch.Tensor, share: float) -> float:
    """The score above which the largest scores add up to ``share`` of their total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    index = min(int(torch.searchsorted(cumulative, share)), len(ordered) - 1)
    return float(ordered[index])


@dataclass
class AttributionGraph:
    """The attribution graph of one prompt.

    Attributes:
        prompt: the prompt's text (decoded from its tokens).
        input_ids: ``(n_pos,)`` token ids, BOS first.
        tokens: the token strings, one per position.
        n_layers: layers of the model (= of the CLT).
        active_features: ``(n_active, 3)`` (layer, position, feature) of every active feature, BOS excluded.
        activations: ``(n_active,)`` their activations.
        selected: ``(n_features,)`` indices into ``active_features`` of the feature nodes (all of them unless
            ``max_features`` capped them).
        logit_ids: ``(n_logits,)`` token ids of the logit nodes; ``logit_tokens`` their strings.
        logit_probabilities: ``(n_logits,)`` their next-token probabilities.
        adjacency: ``(n_nodes, n_nodes)`` direct effects, rows targets, columns sources.
        error_norms: ``(n_layers, n_pos)`` ‖mlp_out − reconstruction‖ of every error node.
        scan: an identifier of the transcoder (circuit-tracer's graph files require one).
    """

    prompt: str
    input_ids: torch.Tensor
    tokens: list[str]
    n_layers: int
    active_features: torch.Tensor
    activations: torch.Tensor
    selected: torch.Tensor
    logit_ids: torch.Tensor
    logit_tokens: list[str]
    logit_probabilities: torch.Tensor
    adjacency: torch.Tensor
    error_norms: torch.Tensor
    scan: str = "cltlab"

    # ------------------------------------------------------------------------------------------- layout

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.selected)

    @property
    def n_logits(self) -> int:
        return len(self.logit_ids)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def feature_node(self, layer: int, position: int, feature: int) -> int:
        """The node index of an active feature; KeyError when it is not a node of this graph."""
        nodes = self.active_features[self.selected]
        match = ((nodes[:, 0] == layer) & (nodes[:, 1] == position) & (nodes[:, 2] == feature)).nonzero()
        if len(match) == 0:
            raise KeyError(
                f"Feature {feature} of layer {layer} at position {position} is not a node of the graph."
            )
        return int(match[0, 0])

    def error_node(self, layer: int, position: int) -> int:
        return self.error_start + layer * self.n_pos + position

    def token_node(self, position: int) -> int:
        return self.token_start + position

    def logit_node(self, rank: int) -> int:
        return self.logit_start + rank

    def node(self, index: int) -> Node:
        """Describe node ``index``."""
        if index < self.error_start:
            layer, pos, feature = self.active_features[self.selected[index]].tolist()
            return Node("feature", layer, pos, feature, float(self.activations[self.selected[index]]))
        if index < self.token_start:
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return Node("error", layer, pos, -1, float(self.error_norms[layer, pos]))
        if index < self.logit_start:
            pos = index - self.token_start
            return Node("token", -1, pos, int(self.input_ids[pos]), 1.0)
        rank = index - self.logit_start
        return Node(
            "logit",
            self.n_layers,
            self.n_pos - 1,
            int(self.logit_ids[rank]),
            float(self.logit_probabilities[rank]),
        )

    def nodes(self) -> list[Node]:
        return [self.node(i) for i in range(self.n_nodes)]

    # ------------------------------------------------------------------------------------------ influence

    def logit_weights(self) -> torch.Tensor:
        """``(n_nodes,)`` the logit probabilities on the logit nodes, zero elsewhere."""
        weights = torch.zeros(self.n_nodes)
        weights[self.logit_start :] = self.logit_probabilities
        return weights

    def node_influence(self) -> torch.Tensor:
        """``(n_nodes,)`` each node's total (direct and indirect) influence on the logits."""
        return influence(normalize_rows(self.adjacency), self.logit_weights())

    def edge_influence(self, adjacency: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_nodes, n_nodes)`` each edge's share of influence: its normalized weight × its target's influence."""
        normalized = normalize_rows(self.adjacency if adjacency is None else adjacency)
        weights = self.logit_weights()
        target_influence = influence(normalized, weights) + weights
        return normalized * target_influence[:, None]

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Keep the nodes that carry ``node_threshold`` of the influence and the edges that carry
        ``edge_threshold`` of it among them; then drop feature and error nodes left without an outgoing edge and
        features without an incoming one, until nothing changes. Tokens and logits are always kept."""
        for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}.")
        node_influence = self.node_influence()
        node_mask = node_influence >= cumulative_threshold(node_influence, node_threshold)
        node_mask[self.token_start :] = True
        pruned = self.adjacency.clone()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        edge_scores = self.edge_influence(pruned)
        edge_mask = edge_scores >= cumulative_threshold(edge_scores, edge_threshold)
        edge_mask &= pruned != 0
        inner = slice(0, self.token_start)  # features and errors
        while True:
            before = node_mask.clone()
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            node_mask[inner] &= edge_mask[:, inner].any(0)  # has an outgoing edge
            node_mask[: self.n_features] &= edge_mask[: self.n_features].any(1)  # has an incoming edge
            if torch.equal(node_mask, before):
                break
        order = node_influence.argsort(descending=True)
        cumulative = torch.zeros_like(node_influence)
        cumulative[order] = node_influence[order].cumsum(0) / node_influence.sum().clamp_min(1e-30)
        return PruneResult(node_mask, edge_mask, cumulative)

    def scores(self) -> GraphScores:
        """The replacement and completeness scores (Ameisen et al. 2025, "Evaluating graphs")."""
        normalized = normalize_rows(self.adjacency)
        weights = self.logit_weights()
        node_influence = influence(normalized, weights)
        errors = slice(self.error_start, self.token_start)
        token_influence = node_influence[self.token_start : self.logit_start].sum()
        error_influence = node_influence[errors].sum()
        replacement = token_influence / (token_influence + error_influence).clamp_min(1e-30)
        non_error = 1 - normalized[:, errors].sum(1)
        output_influence = node_influence + weights
        completeness = (non_error * output_influence).sum() / output_influence.sum()
        return GraphScores(float(replacement), float(completeness))

    # ----------------------------------------------------------------------------------------- save/load

    def save(self, directory: str | Path) -> Path:
        """Write ``graph.safetensors`` (the tensors) and ``graph.json`` (the rest, with a format version)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _TENSORS}
        save_file(tensors, str(directory / "graph.safetensors"))
        meta = {
            name: getattr(self, name) for name in ("prompt", "tokens", "n_layers", "logit_tokens", "scan")
        }
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        (directory / "graph.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AttributionGraph:
        """Read a graph written by ``save`` (no pickle)."""
        directory = Path(directory)
        meta_path, tensor_path = directory / "graph.json", directory / "graph.safetensors"
        if not meta_path.exists() or not tensor_path.exists():
            raise FileNotFoundError(
                f"{directory} is not a saved attribution graph: it needs graph.json and graph.safetensors."
            )
        meta = json.loads(meta_path.read_text())
        if meta.pop("format", None) != FORMAT or meta.pop("format_version", None) != FORMAT_VERSION:
            raise ValueError(f"{meta_path} is not a {FORMAT!r} file of version {FORMAT_VERSION}.")
        return cls(**meta, **load_file(str(tensor_path)))

    def export_graph_files(self, out_dir: str | Path, slug: str, **thresholds) -> Path:
        """Write the pruned graph as circuit-tracer's graph file (see ``cltlab.attribution.export``)."""
        from .export import export_graph_files

        return export_graph_files(self, out_dir, slug, **thresholds)

    def __repr__(self) -> str:
        return (
            f"AttributionGraph({self.prompt!r}: {self.n_features} feature nodes of {len(self.active_features)} "
            f"active, {self.n_layers}×{self.n_pos} errors, {self.n_pos} tokens, {self.n_logits} logits)"
        )


_TENSORS = (
    "input_ids",
    "active_features",
    "activations",
    "selected",
    "logit_ids",
    "logit_probabilities",
    "adjacency",
    "error_norms",
)
