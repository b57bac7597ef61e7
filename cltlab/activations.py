"""TopK and BatchTopK activations, the alternatives to JumpReLU that researchers compare, and the conversion of a
trained BatchTopK transcoder to JumpReLU thresholds.

- **TopK** keeps the ``k`` largest pre-activations of every token (and layer): L0 is exactly ``k``.
- **BatchTopK** (Bussmann et al., 2024) keeps the ``k · n_tokens`` largest pre-activations of a layer over the
  whole batch, so tokens share a budget and L0 is ``k`` on average. Its output depends on the batch, so for
  inference it is converted to a JumpReLU whose per-layer threshold is the mean, over batches, of the smallest
  activation BatchTopK kept (``batchtopk_thresholds``).

Kept values pass through a ReLU; gradients flow to the kept entries only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of the last dimension (ReLU'd), zero the rest."""
    values, index = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, index, values.relu())


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """``(n_tokens, n_layers, d_features)`` → per layer, keep the ``k · n_tokens`` largest entries over all tokens.

    A 2-d ``(n_tokens, d_features)`` input is one layer.
    """
    if pre.dim() == 2:
        return batch_topk(pre[:, None], k)[:, 0]
    n_tokens, L, n_features = pre.shape
    per_layer = pre.transpose(0, 1).reshape(L, n_tokens * n_features)
    values, index = per_layer.topk(min(k * n_tokens, per_layer.shape[1]), dim=-1, sorted=False)
    kept = torch.zeros_like(per_layer).scatter(-1, index, values.relu())
    return kept.view(L, n_tokens, n_features).transpose(0, 1)


@torch.no_grad()
def batchtopk_thresholds(preactivations: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """``(n_layers,)`` JumpReLU thresholds for a BatchTopK transcoder: per layer, the mean over batches of the
    smallest positive activation BatchTopK keeps. ``preactivations`` yields ``(n_tokens, n_layers, d_features)``.
    """
    minima = []
    for pre in preactivations:
        kept = batch_topk(pre, k)
        smallest = torch.where(kept > 0, kept, torch.inf).amin((0, 2))  # (n_layers,)
        minima.append(smallest)
    if not minima:
        raise ValueError("batchtopk_thresholds needs at least one batch of pre-activations.")
    minima = torch.stack(minima)
    return torch.where(torch.isfinite(minima), minima, torch.nan).nanmean(0).nan_to_num(nan=0.0)
