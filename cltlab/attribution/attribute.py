"""Build the attribution graph of one prompt with batched backward passes through the local replacement model.

1. Run the prompt once (``LocalReplacement``): attention patterns and norm denominators are recorded and frozen,
   the CLT encodes every layer's ``resid_mid``; features at BOS are zeroed (as circuit-tracer does), and the
   error node of (layer, position) is ``mlp_out − reconstruction`` (zero at BOS, whose MLP output is a constant).
2. Run the frozen model once more on ``batch_size`` copies of the prompt with every MLP output and the token
   embeddings replaced by autograd leaves. The graph is retained.
3. For each block of ``batch_size`` targets, one backward pass: copy b of the prompt carries target b's direction
   (a feature's encoder direction at its ``resid_mid``, or a logit's unembedding row minus the mean row after the
   final norm). The gradients at the leaves, contracted with each source's vector (a feature's decoder rows at
   every layer it writes to, times its activation; an error vector; a token embedding), give the block's rows.

Rows are computed for the logits first, then for features; with ``max_features`` only the features with the
largest influence on the logits so far get rows (re-ranked every ``update_interval`` blocks, as circuit-tracer does).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from .. import feature_effects
from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from .graph import AttributionGraph, normalize_rows
from .local import LocalReplacement, check_fits, prompt_ids, transcode

log = logging.getLogger("cltlab")


class _Sources:
    """The source side of every row: what each node writes, and how to contract gradients with it."""

    def __init__(self, clt: CrossLayerTranscoder, local: LocalReplacement):
        prompt = local.prompt
        seq, L, _ = prompt.resid_mid.shape
        features, errors = transcode(clt, prompt)
        # Active features ordered by (layer, position, feature), circuit-tracer's order.
        pos, layer, feat = features.nonzero(as_tuple=True)
        order = torch.argsort((layer * seq + pos) * clt.d_features + feat)
        self.active = torch.stack([layer[order], pos[order], feat[order]], 1)  # (n_active, 3)
        self.activations = features[pos[order], layer[order], feat[order]]  # (n_active,)
        self.errors = errors  # (seq, n_layers, d_model)
        self.embeddings = prompt.embeddings.to(clt.W_enc.device)  # (seq, d_model)
        # One bucket per (source layer, position): its features' decoder rows for every layer they write to,
        # scaled by activation, as a (feature, target layer · d_model) matrix: a prefix of target layers is a
        # column block that BLAS reads in place.
        out_scale = clt.output_scale.float()  # (n_layers, 1)
        self.buckets: list[tuple[int, int, slice, torch.Tensor]] = []
        keys = self.active[:, 0] * seq + self.active[:, 1]
        bounds = torch.searchsorted(keys, torch.arange(L * seq + 1, device=keys.device))
        for key in range(L * seq):
            start, stop = int(bounds[key]), int(bounds[key + 1])
            if start == stop:
                continue
            source, position = divmod(key, seq)
            n = clt.n_targets(source)
            W = clt.W_dec[source].detach()[self.active[start:stop, 2]].float()  # (n_feat, n_targets, d_model)
            W = W * out_scale[source : source + n] * self.activations[start:stop, None, None]
            self.buckets.append(
                (source, position, slice(start, stop), W.permute(1, 2, 0).reshape(-1, stop - start))
            )

    @property
    def n_active(self) -> int:
        return len(self.active)

    def rows(self, grad_mlp: torch.Tensor, grad_embed: torch.Tensor, depth: int) -> torch.Tensor:
        """Contract gradients at the MLP outputs ``(batch, seq, n_layers, d_model)`` and the embeddings
        ``(batch, seq, d_model)`` with every source: ``(batch, n_active + n_layers·seq + seq)``. Gradients at
        MLP outputs of layers ``>= depth`` are zero (targets read the residual stream before them) and are skipped."""
        batch, seq, L, d = grad_mlp.shape
        out = grad_mlp.new_zeros(batch, self.n_active + L * seq + seq)
        for source, position, columns, W in self.buckets:
            n = min(W.shape[0] // d, depth - source)  # target layers of this source that can matter
            if n > 0:
                out[:, columns] = (
                    grad_mlp[:, position, source : source + n].reshape(batch, n * d) @ W[: n * d]
                )
        errors = torch.einsum("bsld,sld->bls", grad_mlp[:, :, :depth], self.errors[:, :depth])
        out[:, self.n_active : self.n_active + depth * seq] = errors.flatten(1)
        out[:, self.n_active + L * seq :] = torch.einsum("bsd,sd->bs", grad_embed, self.embeddings)
        return out


def logit_targets(
    logits: torch.Tensor, unembedding: torch.Tensor, *, logit_prob: float, max_logits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The most likely next tokens until their probability adds up to ``logit_prob`` (at most ``max_logits``):
    their ids, probabilities, and directions ``(n, d_model)`` (unembedding row minus the mean row)."""
    probs = torch.softmax(logits.float(), -1)
    top_p, top_ids = probs.topk(min(max_logits, len(probs)))
    n = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(logit_prob))) + 1
    ids = top_ids[:n]
    return ids, top_p[:n], unembedding[ids] - unembedding.mean(0)


def attribute(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    prompt: str | list[int] | torch.Tensor,
    *,
    logit_prob: float = 0.95,
    max_logits: int = 10,
    max_features: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    scan: str = "cltlab",
    progress: bool = True,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (text or token ids; BOS is added when missing) through ``clt``.

    ``max_features`` caps the feature nodes, keeping the most influential; ``batch_size`` targets share one
    backward pass (memory grows with it). See ``AttributionGraph`` for what the graph holds.
    """
    check_fits(model, clt)
    if batch_size < 1 or (max_features is not None and max_features < 0):
        raise ValueError("batch_size must be at least 1 and max_features not negative.")
    started = time.perf_counter()
    ids = prompt_ids(model, prompt)
    clt = clt.to(model.device).eval()
    local = LocalReplacement(model, ids)
    sources = _Sources(clt, local)
    unembedding = feature_effects.unembedding(model).float()
    logit_ids, logit_p, logit_vectors = logit_targets(
        local.prompt.logits, unembedding, logit_prob=logit_prob, max_logits=max_logits
    )
    n_active = sources.n_active
    n_features = n_active if max_features is None else min(max_features, n_active)
    backward = _Backward(local, sources, batch_size)
    rows, row_node, visited = _rows(
        backward, clt, logit_vectors, logit_p, n_features, update_interval=update_interval, progress=progress
    )
    graph = _graph(model, ids, sources, logit_ids, logit_p, rows, row_node, visited, scan=scan)
    seconds = time.perf_counter() - started
    log.info("Attribution of %d tokens: %d of %d features in %.1f s", len(ids), n_features, n_active, seconds)
    return graph


class _Backward:
    """The frozen model run once on ``batch_size`` copies of the prompt, with autograd leaves in place of the token
    embeddings and MLP outputs; calling it gives the rows of a block of targets (one backward pass)."""

    def __init__(self, local: LocalReplacement, sources: _Sources, batch_size: int):
        self.sources, self.batch_size = sources, batch_size
        prompt, L = local.prompt, local.model.n_layers
        self.seq, self.d_model, self.n_layers = prompt.embeddings.shape[-2], local.model.d_model, L
        self.embed_leaf = prompt.embeddings.expand(batch_size, -1, -1).clone().requires_grad_()
        self.mlp_leaves = [
            prompt.mlp_out[:, layer].expand(batch_size, -1, -1).clone().requires_grad_() for layer in range(L)
        ]
        with torch.enable_grad():
            self.resid, self.final = local.run(
                batch=batch_size, embeddings=self.embed_leaf, mlp_fn=lambda layer, _: self.mlp_leaves[layer]
            )

    def __call__(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows for targets reading ``vectors`` ``(n, d_model)`` at (layer, position); layer L is the final norm."""
        outputs, grads = [], []
        index = torch.arange(len(layers))
        for layer in layers.unique().tolist():
            at = layers == layer
            grad = torch.zeros(self.batch_size, self.seq, self.d_model, device=vectors.device)
            grad[index[at], positions[at]] = vectors[at]
            outputs.append(self.final if layer == self.n_layers else self.resid[layer])
            grads.append(grad.to(outputs[-1].dtype))
        leaves = [self.embed_leaf, *self.mlp_leaves]
        found = torch.autograd.grad(outputs, leaves, grads, retain_graph=True, allow_unused=True)
        zero = torch.zeros_like(self.embed_leaf)
        grad_embed = found[0] if found[0] is not None else zero
        grad_mlp = torch.stack([g if g is not None else zero for g in found[1:]], 2)  # (batch, seq, L, d)
        depth = int(layers.max())  # the deepest target reads resid_mid before this layer's MLP (L: after all)
        return self.sources.rows(grad_mlp.float(), grad_embed.float(), depth)[: len(layers)]


def _rows(
    backward: _Backward,
    clt: CrossLayerTranscoder,
    logit_vectors: torch.Tensor,
    logit_p: torch.Tensor,
    n_features: int,
    *,
    update_interval: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of the logits, then of ``n_features`` features (all, or the most influential so far).

    Returns the rows ``(n_logits + n_features, n_columns)``, the target of each row (its feature's column, or
    ``n_columns + rank`` for a logit) and which active features were visited.
    """
    sources, batch_size, L, seq = backward.sources, backward.batch_size, backward.n_layers, backward.seq
    n_active, n_logits = sources.n_active, len(logit_vectors)
    n_columns = n_active + L * seq + seq
    # A feature's pre-activation reads raw resid_mid through W_enc / input_scale: (n_layers, d_model, d_features).
    encoder = clt.W_enc.detach().float() / clt.input_scale.float()[:, :, None]
    bar = tqdm(total=n_logits + n_features, desc="attribution", unit="node", disable=not progress)
    rows = torch.zeros(n_logits + n_features, n_columns)
    row_node = torch.zeros(n_logits + n_features, dtype=torch.long)
    for start in range(0, n_logits, batch_size):
        stop = min(start + batch_size, n_logits)
        n = stop - start
        rows[start:stop] = backward(
            torch.full((n,), L), torch.full((n,), seq - 1), logit_vectors[start:stop]
        ).cpu()
        row_node[start:stop] = n_columns + torch.arange(start, stop)
        bar.update(n)
    done = n_logits
    visited = torch.zeros(n_active, dtype=torch.bool)
    while done < n_logits + n_features:
        remaining = n_logits + n_features - done
        if n_features == n_active:
            pending = torch.arange(n_active)
        else:  # rank the features not yet visited by their influence through the rows computed so far
            influence = _partial_influence(rows[:done], row_node[:done], logit_p, n_columns)
            ranked = influence[:n_active].argsort(descending=True)
            pending = ranked[~visited[ranked]][: min(update_interval * batch_size, remaining)]
            # Blocks of one layer (or few) stop their backward pass early and skip the decoders of later layers.
            pending = pending[sources.active[pending, 0].cpu().argsort(stable=True)]
        for block in pending.split(batch_size):
            layer, position, feature = sources.active[block].T.cpu()
            vectors = encoder[layer, :, feature].to(backward.embed_leaf.device)
            rows[done : done + len(block)] = backward(layer, position, vectors).cpu()
            row_node[done : done + len(block)] = block
            visited[block] = True
            done += len(block)
            bar.update(len(block))
    bar.close()
    return rows, row_node, visited


def _graph(
    model: LoadedModel,
    ids: torch.Tensor,
    sources: _Sources,
    logit_ids: torch.Tensor,
    logit_p: torch.Tensor,
    rows: torch.Tensor,
    row_node: torch.Tensor,
    visited: torch.Tensor,
    *,
    scan: str,
) -> AttributionGraph:
    """The graph of the visited features, the errors, the tokens and the logits, from the rows in node order."""
    n_logits, n_columns = len(logit_ids), rows.shape[1]
    selected = visited.nonzero().flatten()
    keep = torch.cat(
        [selected, torch.arange(sources.n_active, n_columns)]
    )  # the feature nodes, errors and tokens
    n_nodes = len(keep) + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes)
    feature_rows = rows[n_logits:][row_node[n_logits:].argsort()]  # in node order
    adjacency[: len(selected), : len(keep)] = feature_rows[:, keep]
    adjacency[len(keep) :, : len(keep)] = rows[:n_logits][:, keep]
    tokenizer = model.tokenizer
    return AttributionGraph(
        prompt=tokenizer.decode(ids[1:].tolist()),
        input_ids=ids,
        tokens=[tokenizer.decode([t]) for t in ids.tolist()],
        n_layers=model.n_layers,
        active_features=sources.active.cpu(),
        activations=sources.activations.cpu(),
        selected=selected,
        logit_ids=logit_ids.cpu(),
        logit_tokens=[tokenizer.decode([t]) for t in logit_ids.tolist()],
        logit_probabilities=logit_p.cpu(),
        adjacency=adjacency,
        error_norms=sources.errors.norm(dim=-1).T.cpu(),
        scan=scan,
    )


def _partial_influence(
    rows: torch.Tensor, row_node: torch.Tensor, logit_p: torch.Tensor, n_columns: int, max_iter: int = 1000
) -> torch.Tensor:
    """Influence on the logits of every column, through the rows computed so far (``row_node`` names each row's
    target: a column, or ``n_columns + rank`` for a logit)."""
    normalized = normalize_rows(rows)  # (n_rows, n_columns)
    current = torch.zeros(n_columns + len(logit_p))
    current[n_columns:] = logit_p
    total = torch.zeros(n_columns)
    for _ in range(max_iter):
        step = current[row_node] @ normalized  # (n_columns,)
        if not step.any():
            return total
        total += step
        current = torch.cat([step, torch.zeros(len(logit_p))])
    raise RuntimeError(f"Influence did not converge in {max_iter} steps.")
