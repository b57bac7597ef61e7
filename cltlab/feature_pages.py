"""What a feature's page shows, computed with its statistics so that showing a page runs no model.

After the statistics pass has found each feature's top rows, ``context_windows`` takes, for every top row, the
``before`` tokens before it and the ``after`` tokens after it in its sequence, and the feature's activation on
each of them, encoded from the stored ``resid_mid`` rows (what the model computed at harvest time; the rows of
a sequence are found by their ``sequence`` and ``position``, as a forward batch's rows are stored shuffled). It
reads only the buffer blocks that hold such rows and encodes only those rows. ``logit_tables`` lists, for every
feature, the output tokens its decoder promotes and suppresses through the unembedding. ``band_samples`` samples
contexts from bands of each feature's activation range and finds the features most correlated with it.
``top_contexts`` prints a few features' top contexts as text.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder
from .feature_effects import feature_directions

if TYPE_CHECKING:
    from .features import LayerStatistics

WINDOW = (12, 4)
"""Tokens kept before and after each top context's own token."""


class Windows(NamedTuple):
    """The token windows of every feature's top contexts; the top token is at position ``before`` of each."""

    ids: torch.Tensor
    """``(n_layers, d_features, k, before + 1 + after)`` int32 token ids; -1 where the window runs past its
    sequence (or the context slot is empty)."""
    acts: torch.Tensor
    """Same shape, float32: the feature's activation on each token; NaN where no stored row holds it (BOS, a
    sequence cut short by the harvest's token count, an empty slot)."""


@torch.no_grad()
def context_windows(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    top_rows: torch.Tensor,
    *,
    n: int,
    before: int = WINDOW[0],
    after: int = WINDOW[1],
    block_size: int = 4096,
) -> Windows:
    """The windows around ``top_rows`` ``(n_layers, d_features, k)`` (-1: empty) among buffer rows ``[0, n)``."""
    _, sequence, position = (torch.from_numpy(a.astype(np.int64)) for a in buffer.token_info(0, n))
    sequences = torch.from_numpy(buffer.sequences.astype(np.int64))  # (n_sequences, seq_len)
    first = int(buffer.info["shards"][0]["first_sequence"])  # global number of sequences[0]
    filled = top_rows >= 0
    rows = top_rows.clamp_min(0)
    offsets = torch.arange(-before, after + 1)  # (W,)
    at = position[rows].unsqueeze(-1) + offsets  # (L, F, k, W) positions in the sequence
    seq = (sequence[rows] - first).unsqueeze(-1).expand_as(at)
    inside = filled.unsqueeze(-1) & (at >= 1) & (at < sequences.shape[1])  # BOS (position 0) is not shown
    at = at.clamp(0, sequences.shape[1] - 1)
    ids = torch.where(inside, sequences[seq, at], -1).int()
    # The stored row of each window token (a forward batch's rows are stored shuffled): -1 where none is.
    row_of = torch.full(sequences.shape, -1, dtype=torch.long)
    row_of[sequence - first, position] = torch.arange(n)
    near = torch.where(inside, row_of[seq, at], -1)
    stored = near >= 0
    acts = torch.full(ids.shape, float("nan"))
    _encode_entries(clt, buffer, stored, near, acts, block_size)
    return Windows(ids, acts)


def _encode_entries(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    stored: torch.Tensor,
    near: torch.Tensor,
    acts: torch.Tensor,
    block_size: int,
) -> None:
    """Fill ``acts[stored]`` with each entry's feature activation on its row ``near[stored]``, reading only the
    blocks that hold such rows."""
    device = clt.W_enc.device
    n_layers = stored.shape[0]
    entries = []  # per layer: the rows, features and flat slots of its entries, sorted by row
    for layer in range(n_layers):
        feature, slot_k, slot_w = stored[layer].nonzero(as_tuple=True)
        row = near[layer, feature, slot_k, slot_w]
        order = row.argsort()
        flat = (feature * stored.shape[2] + slot_k) * stored.shape[3] + slot_w
        entries.append((row[order], feature[order], flat[order]))
    needed = torch.cat([e[0] for e in entries]).unique()
    starts = (needed // block_size * block_size).unique().tolist()
    for start, stop, resid in buffer.input_blocks(
        starts, block_size, device=device
    ):  # (block, n_layers, d_model)
        for layer, (row, feature, flat) in enumerate(entries):
            lo, hi = torch.searchsorted(row, torch.tensor([start, stop])).tolist()
            if lo == hi:
                continue
            unique, inverse = row[lo:hi].unique(return_inverse=True)
            f = clt.encode_layer(resid[unique - start, layer], layer).cpu()
            acts[layer].view(-1)[flat[lo:hi]] = f[inverse, feature[lo:hi]]


class StoredContext(NamedTuple):
    """One context kept in the statistics, as a page shows it."""

    activation: float
    """The feature's activation on the context's own token."""
    ids: list[int]
    """Token ids of the window (only those inside the sequence)."""
    acts: list[float]
    """The feature's activation on each of them (0 where no stored row held the token)."""
    index: int
    """Position of the context's own token in ``ids``."""


def stored_contexts(stats, layer: int, feature: int, band: int | None = None) -> list[StoredContext]:
    """The top contexts of a feature kept in ``stats`` (a ``FeatureStatistics`` with windows), or those sampled
    from activation ``band``."""
    k = stats.top_rows.shape[-1]
    if band is None:
        rows, values, first = stats.top_rows[layer, feature], stats.top_values[layer, feature], 0
    else:
        rows, values = stats.band_rows[layer, feature, band], stats.band_values[layer, feature, band]
        first = k + band * len(rows)
    out = []
    for j in (rows >= 0).nonzero().flatten().tolist():
        ids = stats.context_ids[layer, feature, first + j].tolist()
        acts = (stats.context_acts[layer, feature, first + j].nan_to_num(0.0) + 0.0).tolist()  # no -0.0
        keep = [i for i, t in enumerate(ids) if t >= 0]
        out.append(
            StoredContext(
                values[j].item(), [ids[i] for i in keep], [acts[i] for i in keep], keep.index(stats.before)
            )
        )
    return out


class LogitTables(NamedTuple):
    """Per feature, the output tokens its decoder pushes up and down most (direct logit effect per unit)."""

    top_ids: torch.Tensor
    """``(n_layers, d_features, n)`` int32, largest effect first."""
    top_values: torch.Tensor
    """``(n_layers, d_features, n)``"""
    bottom_ids: torch.Tensor
    """``(n_layers, d_features, n)`` int32, most negative first."""
    bottom_values: torch.Tensor
    """``(n_layers, d_features, n)``"""


@torch.no_grad()
def logit_tables(
    clt: CrossLayerTranscoder, unembedding: torch.Tensor, *, n: int = 10, chunk: int = 512
) -> LogitTables:
    """``logit_effects`` of every feature at once (features in chunks of ``chunk`` to bound memory)."""
    U = unembedding.float().to(clt.W_enc.device)  # (vocab, d_model)
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for layer in range(clt.n_layers):
        directions = feature_directions(clt, layer)  # (d_features, d_model)
        for start in range(0, clt.d_features, chunk):
            logits = directions[start : start + chunk] @ U.T  # (chunk, vocab)
            up, down = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
            for part, value in zip(parts, (up.indices, up.values, down.indices, -down.values), strict=True):
                part.append(value.cpu())
    shape = (clt.n_layers, clt.d_features, n)
    ids_up, up, ids_down, down = (torch.cat(part).reshape(shape) for part in parts)
    return LogitTables(ids_up.int(), up, ids_down.int(), down)


BANDS = 4
"""Activation bands a feature's sampled contexts come from: (0, ¼], (¼, ½], (½, ¾], (¾, 1] of its maximum."""


class Samples(NamedTuple):
    """Contexts sampled from each activation band, and the features most correlated in activation."""

    band_rows: torch.Tensor
    """``(n_layers, d_features, BANDS, per_band)`` buffer rows, lowest band first (-1 where the band has fewer)."""
    band_values: torch.Tensor
    """Same shape: the feature's activation on them."""
    correlated: torch.Tensor | None
    """``(n_layers, d_features, n)`` the features of the same layer most correlated in activation (Pearson, over
    the tokens read), or None where ``d_features`` is too large for the ``F × F`` sums."""
    correlation: torch.Tensor | None
    """Same shape: their correlation, largest first."""


def row_order(n: int, seed: int = 0) -> torch.Tensor:
    """``(n,)`` each buffer row's place in one seeded random order: a band keeps its rows that come first."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def band_samples(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    max_activation: torch.Tensor,
    *,
    n: int,
    per_band: int = 4,
    n_correlated: int = 8,
    max_correlated_features: int = 1024,
    block_size: int = 4096,
    seed: int = 0,
) -> Samples:
    """A pass over rows ``[0, n)``: per feature and band, the ``per_band`` rows in the band that come first in
    ``row_order`` (a uniform sample without replacement), and the within-layer activation correlations."""
    L, F, device = clt.n_layers, clt.d_features, clt.W_enc.device
    order = row_order(n, seed).to(device)
    keys = torch.full((L, F, BANDS, per_band), n, dtype=torch.long, device=device)  # n: empty
    rows = torch.full_like(keys, -1)
    values = torch.zeros(L, F, BANDS, per_band, device=device)
    correlate = F <= max_correlated_features
    sums = torch.zeros(L, F, dtype=torch.float64, device=device)
    products = torch.zeros(L, F, F, dtype=torch.float64, device=device) if correlate else None
    peak = max_activation.to(device).clamp_min(1e-12)
    bands = torch.arange(BANDS, device=device).view(BANDS, 1, 1)
    for start, stop, resid in buffer.input_blocks(range(0, n, block_size), block_size, stop=n, device=device):
        block_keys = order[start:stop].unsqueeze(1)  # (block, 1)
        for layer in range(L):
            f = clt.encode_layer(resid[:, layer], layer)  # (block, F)
            if correlate:
                sums[layer] += f.sum(0)
                products[layer] += (f.T @ f).double()
            band = (f / peak[layer] * BANDS).ceil().long().clamp_(1, BANDS) - 1
            # every band at once: (BANDS, block, F), a row's key where it is active in that band
            key = torch.where((f > 0) & (band == bands), block_keys, n)
            best = key.topk(min(per_band, stop - start), dim=1, largest=False)  # (BANDS, m, F)
            merged_keys = torch.cat([keys[layer], best.values.permute(2, 0, 1)], 2)  # (F, BANDS, ·)
            merged_rows = torch.cat([rows[layer], best.indices.permute(2, 0, 1) + start], 2)
            best_values = f.T.unsqueeze(0).expand(BANDS, -1, -1).gather(2, best.indices.transpose(1, 2))
            merged_values = torch.cat([values[layer], best_values.transpose(0, 1)], 2)
            top = merged_keys.topk(per_band, dim=2, largest=False)
            keys[layer] = top.values
            rows[layer] = merged_rows.gather(2, top.indices)
            values[layer] = merged_values.gather(2, top.indices)
    empty = keys >= n
    rows[empty], values[empty] = -1, 0.0
    correlated = correlation = None
    if correlate:
        mean = sums / n
        covariance = products / n - mean.unsqueeze(2) * mean.unsqueeze(1)  # (L, F, F)
        std = covariance.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        pearson = covariance / (std.unsqueeze(2) * std.unsqueeze(1)).clamp_min(1e-12)
        pearson.diagonal(dim1=1, dim2=2).fill_(-2.0)  # not itself
        top = pearson.float().topk(min(n_correlated, F - 1), dim=2)
        correlated, correlation = top.indices.cpu(), top.values.cpu()
    return Samples(rows.cpu(), values.cpu(), correlated, correlation)


class FeatureContexts(NamedTuple):
    """Top-activating contexts of a few features; renders as an HTML table in a notebook."""

    layer: int
    rows: list[tuple[int, float, str, str, str]]
    """``(feature, activation, text before, token, text after)``"""

    def _repr_html_(self) -> str:
        lines = [
            "<table><tr><th>layer</th><th>feature</th><th>activation</th><th style='text-align:left'>context</th></tr>"
        ]
        for feature, act, before, token, after in self.rows:
            context = (
                f"{html.escape(before)}<mark style='background:#fdae61'><b>{html.escape(token)}</b></mark>"
                f"{html.escape(after)}"
            )
            lines.append(
                f"<tr><td>{self.layer}</td><td>{feature}</td><td>{act:.3f}</td>"
                f"<td style='text-align:left;font-family:monospace;white-space:pre'>{context}</td></tr>"
            )
        return "\n".join(lines + ["</table>"])

    def __str__(self) -> str:
        return "\n".join(f"L{self.layer} #{f} {a:7.3f}  {b}[[{t}]]{c}" for f, a, b, t, c in self.rows)


def top_contexts(
    stats: LayerStatistics,
    buffer: DiscBuffer,
    tokenizer,
    features: list[int],
    *,
    per_feature: int = 5,
    window: int = 8,
) -> FeatureContexts:
    """Text around the top activations of ``features``: ``window`` tokens before and ``window // 2`` after."""

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids).replace("\n", "⏎")

    rows = []
    for feature in features:
        top = zip(stats.top_values[feature][:per_feature], stats.top_rows[feature][:per_feature], strict=True)
        for value, row in top:
            if row < 0:
                continue
            ids, i = buffer.context(int(row), before=window, after=window // 2)
            rows.append((feature, float(value), text(ids[:i]), text(ids[i : i + 1]), text(ids[i + 1 :])))
    return FeatureContexts(stats.layer, rows)
