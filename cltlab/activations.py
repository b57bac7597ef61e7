"""A transcoder's activation function: the ``Activation`` interface, TopK and BatchTopK (the alternatives to
JumpReLU that researchers compare), the conversion of a trained BatchTopK transcoder to JumpReLU thresholds, and
``ACTIVATIONS``, the one map from ``CLTConfig.activation_kind`` to a class.

- **TopK** keeps the ``k`` largest pre-activations of every token (and layer): L0 is exactly ``k``.
- **BatchTopK** (Bussmann et al., 2024) keeps the ``k · n_tokens`` largest pre-activations of a layer over the
  whole batch, so tokens share a budget and L0 is ``k`` on average. Its output depends on the batch, so for
  inference it is converted to a JumpReLU whose per-layer threshold is the mean, over batches, of the smallest
  activation BatchTopK kept (``batchtopk_thresholds``).

Kept values pass through a ReLU; gradients flow to the kept entries only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .jumprelu import JumpReLU

if TYPE_CHECKING:
    from .config import CLTConfig


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


class Activation(Protocol):
    """What a transcoder asks of its activation function. ``pre`` is ``(batch, n_layers, d_features)``.

    Attributes:
        log_threshold: ``(n_layers, d_features)`` log θ, under the same name in every kind so that every saved
            transcoder has the same tensors (only JumpReLU uses and trains it).
    """

    log_threshold: nn.Parameter

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations → features, like ``pre``."""

    def forward_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-activations of one layer ``(..., d_features)`` → its features."""

    def gradient_support(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Bool, like ``pre``: where a gradient flows back to the input or θ (what sparse decoding computes)."""

    def preact_loss(self, pre: torch.Tensor, decoder_norms: torch.Tensor) -> torch.Tensor:
        """The pre-activation loss term (a scalar); ``decoder_norms`` is ``(n_layers, d_features)``."""

    def selection_budget(self, d_features: int) -> float | None:
        """The fraction of a layer's entries kept, when the activation keeps a fixed number and passes no
        gradient to the others (then ``select`` says which; see ``cltlab.selected``), else None."""

    def to_jumprelu(self, preactivations: Iterable[torch.Tensor], *, bandwidth: float) -> JumpReLU:
        """A JumpReLU that stands in for this activation at inference, fitted on batches of pre-activations."""


class TopK(nn.Module):
    """Keeps the ``k`` largest pre-activations of every token and layer (ReLU'd).

    Attributes:
        k: active features per token and layer.
        log_threshold: ``(n_layers, d_features)``, frozen and unused: a TopK transcoder is saved with the same
            tensors as a JumpReLU one.
    """

    def __init__(self, shape: tuple[int, int], *, k: int, threshold_init: float = 0.1):
        super().__init__()
        self.k = k
        # Frozen: DDP refuses a trainable parameter that gets no gradient.
        log_threshold = torch.full(shape, float(threshold_init)).log()
        self.log_threshold = nn.Parameter(log_threshold, requires_grad=False)

    @classmethod
    def from_config(cls, config: CLTConfig) -> TopK:
        return cls((config.n_layers, config.d_features), k=config.k, threshold_init=config.threshold_init)

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return topk(pre, self.k)

    def forward_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        return topk(pre, self.k)

    def gradient_support(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The kept entries."""
        return features > 0

    def preact_loss(self, pre: torch.Tensor, decoder_norms: torch.Tensor) -> torch.Tensor:
        """Zero: every token keeps k features, so none needs pulling back."""
        return pre.new_zeros(())

    def selection_budget(self, d_features: int) -> float:
        """k of every ``d_features``."""
        return self.k / d_features

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, values)`` of the k largest entries of each row of one layer's ``(batch, d_features)``."""
        values, cols = pre.topk(self.k, dim=-1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)
        return rows, cols.flatten(), values.flatten()

    @torch.no_grad()
    def to_jumprelu(self, preactivations: Iterable[torch.Tensor], *, bandwidth: float) -> JumpReLU:
        """Per layer, θ is the mean over the batches of the smallest activation BatchTopK kept."""
        theta = batchtopk_thresholds(preactivations, self.k)  # (n_layers,)
        converted = JumpReLU(tuple(self.log_threshold.shape), bandwidth=bandwidth)
        converted.log_threshold.copy_(theta.clamp_min(1e-6).log()[:, None].expand_as(converted.log_threshold))
        return converted

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(TopK):
    """Keeps the ``k · n_tokens`` largest pre-activations of each layer over the batch (see ``batch_topk``)."""

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return batch_topk(pre, self.k)

    def forward_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """All of ``pre``'s leading dimensions count as tokens of one batch."""
        return batch_topk(pre.reshape(-1, pre.shape[-1]), self.k).view(pre.shape)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, values)``, sorted by row, of the ``k · batch`` largest entries of ``(batch, d_features)``."""
        values, flat = pre.flatten().topk(min(self.k * pre.shape[0], pre.numel()), sorted=False)
        flat, order = flat.sort()
        return flat // pre.shape[1], flat % pre.shape[1], values[order]


ACTIVATIONS: dict[str, type[JumpReLU | TopK]] = {"jumprelu": JumpReLU, "topk": TopK, "batchtopk": BatchTopK}
"""``CLTConfig.activation_kind`` → the class; each builds itself with ``from_config``."""


def activation_for(config: CLTConfig) -> Activation:
    """The activation function ``config`` names, shaped ``(n_layers, d_features)``."""
    return ACTIVATIONS[config.activation_kind].from_config(config)
