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


CHUNK_BYTES = 8 << 20
"""Size of the row blocks in which the reductions below make their temporaries: glibc gives every block over
32 MiB fresh pages from the kernel, whose first writes page-fault (a (1024, 12, 3072) float32 temporary costs
~90 ms to allocate and fill, ~12 ms to refill), while smaller freed blocks are reused."""


def row_chunks(x: torch.Tensor) -> list[slice]:
    """Slices of ``x``'s first dimension of about ``CHUNK_BYTES`` each (at least one row)."""
    rows = max(1, CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
    return [slice(i, i + rows) for i in range(0, max(len(x), 1), rows)]


class _JumpReLUFunction(torch.autograd.Function):
    """Few passes over ``x``: the forward keeps its ``x > θ`` mask for the backward, which selects with it; θ's
    gradient sums the kernel's window (``θ − ε/2 < x < θ + ε/2``, i.e. ``|x − θ| / ε < ½``) block by block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        above = x > threshold
        ctx.save_for_backward(x, threshold, above)
        ctx.bandwidth = bandwidth
        return torch.where(above, x, 0.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, threshold, above = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = torch.where(above, grad_out, 0.0) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            low, high = threshold - eps / 2, threshold + eps / 2
            # θ broadcasts over x's first dimension (else one block)
            blocks = row_chunks(x) if threshold.dim() < x.dim() else [slice(None)]
            grad_threshold = sum(  # summed in θ's dtype (float32 under bf16 autocast)
                torch.where(
                    (x[rows] > low).logical_and_(x[rows] < high), grad_out[rows].to(threshold.dtype), 0.0
                ).sum_to_size(threshold.shape)
                for rows in blocks
            )
            grad_threshold = grad_threshold * (-(threshold / eps))
        return grad_x, grad_threshold, None


class _PenaltiesFunction(torch.autograd.Function):
    """``(Σ tanh(c · ‖W_dec‖ · f), Σ relu(θ − h) · ‖W_dec‖)`` over every entry of a dense JumpReLU step, in a
    few passes over the ``(batch, n_layers, d_features)`` tensors instead of autograd's two dozen: the sums over
    the batch are taken (in row blocks, see ``CHUNK_BYTES``) before the ``(n_layers, d_features)`` norms multiply
    in, the backward turns the saved tanh into its slope in place, and each gradient is one expression. The
    pre-activation term's gradient at ``h == θ`` is the one below θ (autograd's relu takes 0 there)."""

    @staticmethod
    def forward(ctx, pre, features, threshold, norms, c: float):
        squashed = torch.mul(features, c * norms).tanh_()
        below = sum((threshold - pre[rows]).clamp_min_(0).sum(0) for rows in row_chunks(pre))  # (L, F)
        ctx.save_for_backward(pre, features, threshold, norms, below)
        # an intermediate, kept on ctx (not saved) so that the backward may turn it into the slope in place
        ctx.c, ctx.slope, ctx.is_slope = c, squashed, False
        return squashed.sum(), (below * norms).sum()

    @staticmethod
    def backward(ctx, grad_sparsity, grad_preact):
        pre, features, threshold, norms, below = ctx.saved_tensors
        slope = ctx.slope
        if not ctx.is_slope:  # d tanh(u) = (1 − tanh²(u)) du, once even if the graph is retained
            slope.mul_(slope).neg_().add_(1)
            ctx.is_slope = True
        scale = grad_sparsity * ctx.c  # d tanh(c·n·f) = slope · c · (n df + f dn)
        grad_features = slope * (scale * norms)
        grad_norms = below * grad_preact
        for rows in row_chunks(features):
            grad_norms = grad_norms + (features[rows] * slope[rows]).sum(0) * scale
        # d relu(θ − h) · n = −n dh + n dθ below θ
        grad_pre = torch.where(pre < threshold, -grad_preact * norms, 0.0)
        return grad_pre, grad_features, -grad_pre.sum(0), grad_norms, None


def dense_penalties(pre, features, threshold, norms, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparsity and pre-activation sums of a dense JumpReLU step (see ``_PenaltiesFunction``): ``pre`` and
    ``features`` ``(batch, n_layers, d_features)``, ``threshold`` and ``norms`` ``(n_layers, d_features)``."""
    return _PenaltiesFunction.apply(pre, features, threshold, norms, c)


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
