"""JumpReLU with a learnable threshold and a rectangle-kernel pseudo-gradient (Rajamanoharan et al., 2024).

    y = x · H(x − θ)

The step H has no useful derivative, so the backward pass uses a straight-through estimate for θ:

    ∂y/∂θ ≈ −(θ / ε) · K((x − θ) / ε),   K(u) = 1 if |u| < ½ else 0   (a rectangle of width ε around θ)

and the input gradient is ∂y/∂x = H(x − θ): zero below the threshold. We follow circuit-tracer and the paper
here rather than passing the gradient through below θ; features below threshold are pulled back by the
separate pre-activation loss (see ``clt.py``), which is what that loss exists for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import CLTConfig


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 on (−½, ½), 0 elsewhere."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = grad_out * (x > threshold).to(grad_out.dtype)
        grad_threshold = grad_out * (-(threshold / eps) * rectangle((x - threshold) / eps))
        # Reduce over the broadcast dimensions back to θ's shape.
        while grad_threshold.dim() > threshold.dim():
            grad_threshold = grad_threshold.sum(0)
        for dim, size in enumerate(threshold.shape):
            if size == 1 and grad_threshold.shape[dim] != 1:
                grad_threshold = grad_threshold.sum(dim, keepdim=True)
        return grad_x, grad_threshold, None


def jumprelu(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Functional JumpReLU; ``threshold`` broadcasts against ``x`` from the right."""
    return _JumpReLUFunction.apply(x, threshold, bandwidth)


class JumpReLU(nn.Module):
    """JumpReLU with one learnable threshold per feature; a transcoder's ``activations.Activation``.

    Attributes:
        log_threshold: ``(*shape)`` — θ = exp(log_threshold), so θ stays positive.
        bandwidth: ε of the rectangle kernel.
    """

    def __init__(self, shape: tuple[int, ...] | int, *, threshold_init: float = 0.1, bandwidth: float = 0.1):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.log_threshold = nn.Parameter(torch.full(shape, float(threshold_init)).log())
        self.bandwidth = bandwidth

    @classmethod
    def from_config(cls, config: CLTConfig) -> JumpReLU:
        """Thresholds ``(n_layers, d_features)`` starting at ``config.threshold_init``."""
        shape = (config.n_layers, config.d_features)
        return cls(shape, threshold_init=config.threshold_init, bandwidth=config.bandwidth)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(x, self.threshold, self.bandwidth)

    def forward_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-activations of one layer ``(..., d_features)`` → its features, without a pseudo-gradient for θ."""
        return pre * (pre > self.threshold[layer])

    def gradient_support(self, pre: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Bool, like ``pre``: above θ (the input gradient) and within ε/2 below it (θ's pseudo-gradient)."""
        return pre > self.threshold - self.bandwidth / 2

    def preact_loss(self, pre: torch.Tensor, decoder_norms: torch.Tensor) -> torch.Tensor:
        """Σ relu(θ − h) · ‖W_dec‖ over layers and features, averaged over the batch: it pulls features that
        have stopped firing back towards their threshold. ``pre`` is ``(batch, n_layers, d_features)``."""
        return (torch.relu(self.threshold - pre) * decoder_norms).sum((1, 2)).mean()

    def selection_budget(self, d_features: int) -> None:
        """None: a JumpReLU keeps no fixed number of features, and θ's gradient reaches entries it did not keep."""
        return None

    def to_jumprelu(self, preactivations: Iterable[torch.Tensor], *, bandwidth: float) -> JumpReLU:
        raise ValueError("to_jumprelu converts a topk or batchtopk transcoder; this one is already jumprelu.")

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_threshold.shape)}, bandwidth={self.bandwidth}"
