"""Feature statistics and top-activating contexts, from one streaming pass over a DiscBuffer.

Memory stays bounded by the number of features times ``k``, however many tokens are read.
"""

from __future__ import annotations

import html
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder


class FeatureStats(NamedTuple):
    """Statistics of the features of one layer over ``n_tokens`` tokens."""

    layer: int
    """CLT layer index (model layer = layer + clt.config.layer_offset)."""
    frequency: torch.Tensor
    """``(d_features,)`` fraction of tokens on which the feature is active."""
    max_activation: torch.Tensor
    """``(d_features,)``"""
    mean_activation: torch.Tensor
    """``(d_features,)`` mean activation over the tokens where it is active."""
    top_values: torch.Tensor
    """``(d_features, k)`` largest activations, descending (0 where fewer than k tokens fired)."""
    top_rows: torch.Tensor
    """``(d_features, k)`` buffer rows of those activations."""
    n_tokens: int
    """Tokens read."""

    def top_features(self, n: int = 5, *, by: str = "frequency") -> list[int]:
        """The ``n`` live features with the largest ``frequency`` or ``max_activation``."""
        score = getattr(self, by).clone()
        score[self.frequency == 0] = -1
        return score.argsort(descending=True)[:n].tolist()

    @property
    def dead_fraction(self) -> float:
        return (self.frequency == 0).float().mean().item()


@torch.no_grad()
def feature_stats(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    layer: int,
    *,
    k: int = 10,
    block_size: int = 4096,
    max_tokens: int | None = None,
    progress: bool = True,
) -> FeatureStats:
    """Stream ``buffer`` in file order and collect statistics of the features of ``layer``."""
    buffer.check_compatible(clt.n_layers, clt.d_model)
    if not 0 <= layer < clt.n_layers:
        raise ValueError(f"layer must be in [0, {clt.n_layers}), not {layer}.")
    n = min(buffer.n_tokens, max_tokens or buffer.n_tokens)
    F = clt.d_features
    count, total, peak = torch.zeros(F), torch.zeros(F), torch.zeros(F)
    top_values, top_rows = torch.zeros(F, k), torch.full((F, k), -1, dtype=torch.long)
    for start in tqdm(range(0, n, block_size), desc=f"features L{layer}", disable=not progress):
        stop = min(start + block_size, n)
        x = buffer.read(start, stop).resid_mid[:, layer].float()  # (block, d_model)
        f = clt.encode_layer(x, layer).cpu()  # (block, d_features)
        count += (f > 0).sum(0)
        total += f.sum(0)
        peak = torch.maximum(peak, f.max(0).values)
        rows = torch.arange(start, stop).expand(F, -1)  # (d_features, block)
        values = torch.cat([top_values, f.T], 1)
        best = values.topk(k, dim=1)
        top_values, top_rows = best.values, torch.cat([top_rows, rows], 1).gather(1, best.indices)
    top_rows[top_values <= 0] = -1
    return FeatureStats(layer, count / n, peak, total / count.clamp_min(1), top_values, top_rows, n)


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
    stats: FeatureStats,
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
