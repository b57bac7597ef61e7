"""Training a TopK / BatchTopK transcoder from the features it selects, never forming ``(batch, d_features)``.

The activation keeps a fixed budget of entries per layer (k per token, or k · batch over the batch), and the
gradient reaches no other entry. So after the one dense product every step needs — the encoder's pre-activations,
from which the k largest are chosen — everything else runs on the selected entries, a sparse ``(rows, cols,
values)`` list per layer:

- **encoder backward**: ``∂W_enc[l]`` is ``x[l]ᵀ`` times a matrix with one nonzero per selected entry, summed by
  ``embedding_bag`` with the entries grouped by feature (no ``(batch, d_features)`` gradient, no dense matmul);
- **decoder**: forward ``embedding_bag`` of the selected rows, backward the same kernel transposed for ``∂W_dec``
  and a sampled product for ``∂values`` (``cltlab.decoding``'s sparse kernels).

A JumpReLU transcoder keeps no fixed budget, but at a trained CLT's sparsity it takes the same road
(``ThresholdEncode``): its step needs the entries above θ (the features) and those within ε/2 below it (θ's
pseudo-gradient), and of the rest only a sum per feature — Σ relu(θ − pre), the pre-activation loss — whose
gradient, the same for every token, makes the encoder's gradient one outer product plus the sparse part.

The losses and gradients equal the dense path's (``tests/test_decoding.py``); ``CrossLayerTranscoder.loss`` takes
this path for ``decoding="sparse"``, and for ``"auto"`` on the CPU when k (JumpReLU: the entries the step needs) is
under ``SPARSE_MAX_DENSITY`` of the features.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .decoding import (
    SPARSE_MAX_DENSITY,
    add_norm_gradient,
    bag_sum,
    bag_sum_transposed,
    decoder_norms,
    norm_gradient_scale,
    sampled_gradient,
)
from .jumprelu import rectangle


class Selected(NamedTuple):
    """The entries an activation kept, all layers together, ordered by layer then row."""

    values: torch.Tensor
    """``(nnz,)`` the kept activations (positive)."""
    rows: torch.Tensor
    """``(nnz,)`` token of each entry."""
    cols: torch.Tensor
    """``(nnz,)`` feature of each entry."""
    counts: torch.Tensor
    """``(n_layers,)`` entries per layer (on the CPU)."""

    def layers(self) -> torch.Tensor:
        """``(nnz,)`` layer of each entry."""
        return _layers(self.counts, self.rows.device)


def use_selected(activation, d_features: int, device: torch.device, mode: str) -> bool:
    """Whether ``CrossLayerTranscoder.loss`` should take this path for decoding ``mode``."""
    budget = activation.selection_budget(d_features)  # fraction of entries kept; None: not a fixed budget
    if budget is None or mode == "dense":
        return False
    return mode == "sparse" or (device.type == "cpu" and budget < SPARSE_MAX_DENSITY)


class SelectEncode(torch.autograd.Function):
    """``x (batch, L, d)``, ``W_enc (L, d, F)``, ``b_enc (L, F)`` → the kept pre-activations and where they are.

    ``select`` maps one layer's pre-activations ``(batch, F)`` to the chosen ``(rows, cols, values)``, by row;
    entries at or below zero are dropped (the ReLU after the selection). Returns ``values, rows, cols`` and the
    number of entries per layer (a CPU tensor).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, select):
        parts = []
        with torch.no_grad():
            for layer in range(x.shape[1]):
                pre = torch.addmm(b_enc[layer], x[:, layer], W_enc[layer])  # (batch, F)
                rows, cols, values = select(pre)
                kept = values > 0
                if not kept.all():
                    rows, cols, values = rows[kept], cols[kept], values[kept]
                parts.append((values, rows, cols))
        values, rows, cols = (torch.cat(column) for column in zip(*parts, strict=True))
        counts = torch.tensor([part[0].numel() for part in parts])
        ctx.n_features = W_enc.shape[-1]
        ctx.save_for_backward(x, rows, cols, counts)
        ctx.mark_non_differentiable(rows, cols, counts)
        return values, rows, cols, counts

    @staticmethod
    def backward(ctx, grad_values, *_):
        x, rows, cols, counts = ctx.saved_tensors
        batch, L, d = x.shape
        F = ctx.n_features
        grad_W = x.new_zeros(L, d, F) if ctx.needs_input_grad[1] else None
        grad_b = x.new_zeros(L, F) if ctx.needs_input_grad[2] else None
        if grad_W is not None:
            _add_encoder_gradient(grad_W, x, counts, rows, cols, grad_values)
        if grad_b is not None:
            grad_b.index_put_(
                (_layers(counts, cols.device), cols), grad_values.to(grad_b.dtype), accumulate=True
            )
        return None, grad_W, grad_b, None


class ThresholdEncode(torch.autograd.Function):
    """JumpReLU's side of a step from the entries it needs: normalized ``x (batch, L, d)``, ``W_enc``, ``b_enc``,
    ``theta (L, F)``, the pre-activations ``pre (batch, L, F)`` computed without grad, ``entries`` — rows, cols and
    per-layer counts of the entries above ``θ − ε/2`` (``threshold_entries``) — and ε.

    Returns the entries' feature values (the pre-activation above θ, else 0), rows, cols, counts, and
    ``relu_sum (L, F)`` = Σ over tokens of relu(θ − pre), formed as ``batch · θ − Σ pre + Σ_{pre > θ} (pre − θ)``:
    one reduction over ``pre``. Backward, as the dense ``JumpReLU`` + pre-activation loss give: ∂pre is the
    feature's gradient above θ and ``−∂relu_sum`` elsewhere (an entry exactly at θ is counted below it), so
    ``∂W_enc[l] = −(Σ x[l]) ⊗ ∂relu_sum[l]`` plus a sparse sum over the entries above θ; θ gets the rectangle
    pseudo-gradient of the entries within ε/2 and ``∂relu_sum`` times the count below it.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, pre, entries, bandwidth):
        rows, cols, counts = entries
        batch, L, F = pre.shape
        layers = _layers(counts, rows.device)
        with torch.no_grad():
            pre_values = pre[rows, layers, cols].float()
            theta_e = theta[layers, cols]
            active = pre_values > theta_e
            values = torch.where(active, pre_values, 0.0)
            at = (layers, cols)
            excess = torch.zeros_like(theta).index_put_(
                at, (pre_values - theta_e).clamp_min(0), accumulate=True
            )
            total = pre.sum(0, dtype=torch.float64)
            relu_sum = (batch * theta.double() - total + excess.double()).clamp_min(0).to(theta.dtype)
            below = batch - torch.zeros_like(theta).index_put_(at, active.to(theta.dtype), accumulate=True)
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(x, W_enc, theta, rows, cols, layers, pre_values, active, below)
        ctx.mark_non_differentiable(rows, cols, counts)
        return values, rows, cols, counts, relu_sum

    @staticmethod
    def backward(ctx, grad_values, _rows, _cols, _counts, grad_relu_sum):
        x, W_enc, theta, rows, cols, layers, pre_values, active, below = ctx.saved_tensors
        batch, L, d = x.shape
        F = theta.shape[1]
        grad_values = torch.zeros_like(pre_values) if grad_values is None else grad_values.float()
        grad_relu_sum = torch.zeros_like(theta) if grad_relu_sum is None else grad_relu_sum.float()
        theta_e, eps = theta[layers, cols], ctx.bandwidth
        pseudo = grad_values * (-(theta_e / eps) * rectangle((pre_values - theta_e) / eps))
        grad_theta = (grad_relu_sum * below).index_put_((layers, cols), pseudo, accumulate=True)
        # above θ: the feature's gradient, less the −∂relu_sum that every other entry of the feature gets
        rows, cols, layers = rows[active], cols[active], layers[active]
        correction = grad_values[active] + grad_relu_sum[layers, cols]
        grad_b = (-batch * grad_relu_sum).index_put_((layers, cols), correction, accumulate=True)
        grad_W = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.einsum("ld,lf->ldf", x.float().sum(0), -grad_relu_sum)
            _add_encoder_gradient(
                grad_W, x, torch.bincount(layers, minlength=L).cpu(), rows, cols, correction
            )
        if ctx.needs_input_grad[0]:
            grad_pre = (
                (-grad_relu_sum)
                .expand(batch, L, F)
                .clone()
                .index_put_((rows, layers, cols), correction, accumulate=True)
            )
            grad_x = torch.einsum("blf,ldf->bld", grad_pre, W_enc.float())
        return grad_x, grad_W, grad_b.to(theta.dtype), grad_theta, None, None, None


class AttachPreactivations(torch.autograd.Function):
    """Pre-activations computed without grad, given the gradient they would have had: ``x (batch, L, d)``,
    ``W_enc``, ``b_enc``, ``pre`` → ``pre``, whose backward is the encoder's (for ``auto`` decoding, which looks
    at the pre-activations before it chooses a path)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre):
        ctx.save_for_backward(x, W_enc)
        return pre.clone() if pre.requires_grad else pre.detach()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc = ctx.saved_tensors
        grad_x = torch.einsum("blf,ldf->bld", grad, W_enc.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_W = torch.einsum("bld,blf->ldf", x.to(grad.dtype), grad).to(W_enc.dtype)
        return grad_x, grad_W, grad.sum(0).to(W_enc.dtype), None


def threshold_entries(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float):
    """Rows, cols and per-layer counts (a CPU tensor) of the entries of ``pre (batch, L, F)`` above
    ``θ − ε/2``, ordered by layer then row: where a JumpReLU step needs a gradient."""
    parts = [
        (pre[:, layer] > theta[layer] - bandwidth / 2).nonzero(as_tuple=True) for layer in range(pre.shape[1])
    ]
    counts = torch.tensor([len(part[0]) for part in parts])
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), counts


class DecodeSelected(torch.autograd.Function):
    """The kept entries → the reconstruction ``(batch, L, d_model)``: ``Σ_s values_s · W_s[cols_s]`` written into
    the targets of each source s, as ``decoding.Decode`` does for its sparse sources; and the decoder norms, whose
    gradient (the sparsity penalty's, nonzero for the kept features alone) joins the decoder's in place."""

    @staticmethod
    def forward(ctx, values, rows, cols, counts, batch, *weights):
        L, d = len(weights), weights[0].shape[-1]
        out = values.new_zeros(batch, L * d)
        norms = decoder_norms(weights)
        for source, (r, c, v) in enumerate(_per_layer(counts, rows, cols, values)):
            W = weights[source].reshape(weights[source].shape[0], -1)
            r, c, v = _nonzero(r, c, v)
            out[:, source * d : source * d + W.shape[1]] += bag_sum(r, c, v, W.to(values.dtype), batch)
        ctx.save_for_backward(values, rows, cols, counts, norms, *weights)
        return out.view(batch, L, d), norms

    @staticmethod
    def backward(ctx, grad_out, grad_norms):
        values, rows, cols, counts, norms, *weights = ctx.saved_tensors
        batch, L, d = grad_out.shape
        grad = grad_out.reshape(batch, L * d)
        grad_values = torch.empty_like(values) if ctx.needs_input_grad[0] else None
        grad_weights, start = [], 0
        for source, (r, c, v) in enumerate(_per_layer(counts, rows, cols, values)):
            W = weights[source]
            flat = W.reshape(W.shape[0], -1)
            g = grad[:, source * d : source * d + flat.shape[1]].float().contiguous()
            if grad_values is not None:
                grad_values[start : start + v.numel()] = sampled_gradient(r, c, g, flat)
            start += v.numel()
            if not ctx.needs_input_grad[5 + source]:
                grad_weights.append(None)
                continue
            grad_W = bag_sum_transposed(*_nonzero(r, c, v), g, W.shape[0]).to(W.dtype)
            scale = None if grad_norms is None else norm_gradient_scale(grad_norms, norms, source)
            grad_weights.append(add_norm_gradient(grad_W, W, scale))
        return grad_values, None, None, None, None, *grad_weights


def _layers(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(nnz,)`` layer of each entry, for entries held layer after layer, ``counts`` of each."""
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts.to(device))


def _add_encoder_gradient(grad_W, x, counts, rows, cols, grads) -> None:
    """``grad_W[l][:, f] += Σ`` over layer l's entries of feature f of ``grad · x[row, l]``: ``x[l]ᵀ`` times a
    sparse matrix, by ``embedding_bag`` with the entries grouped by feature (no dense ``(batch, F)`` gradient)."""
    n_features = grad_W.shape[-1]
    for layer, (r, c, g) in enumerate(_per_layer(counts, rows, cols, grads)):
        grad_W[layer] += bag_sum_transposed(r, c, g, x[:, layer].float().contiguous(), n_features).T


def _nonzero(rows, cols, values):
    """The entries whose value is not zero (a JumpReLU's entries just below θ are kept for θ's gradient alone)."""
    keep = values != 0
    return (rows, cols, values) if bool(keep.all()) else (rows[keep], cols[keep], values[keep])


def _per_layer(counts: torch.Tensor, *columns: torch.Tensor):
    """Each layer's slice of ``columns``, which hold the entries of all layers one after the other."""
    sizes = counts.tolist()
    return zip(*(column.split(sizes) for column in columns), strict=True)


def select_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, select) -> Selected:
    """The entries ``select`` keeps of every layer, from normalized ``x (batch, L, d)``."""
    values, rows, cols, counts = SelectEncode.apply(x, W_enc, b_enc, select)
    return Selected(values, rows, cols, counts)


def decode_selected(
    chosen: Selected, weights: list[torch.Tensor], batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(batch, L, d_model)`` normalized reconstruction from the kept entries (no decoder bias), and the
    ``(L, d_features)`` decoder norms."""
    return DecodeSelected.apply(chosen.values, chosen.rows, chosen.cols, chosen.counts, batch, *weights)
