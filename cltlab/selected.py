"""Training a TopK / BatchTopK transcoder from the features it selects, never forming ``(batch, d_features)``.

The activation keeps a fixed budget of entries per layer (k per token, or k · batch over the batch), and the
gradient reaches no other entry. So after the one dense product every step needs — the encoder's pre-activations,
from which the k largest are chosen — everything else runs on the selected entries, a sparse ``(rows, cols,
values)`` list per layer:

- **encoder backward**: ``∂W_enc[l]`` is ``x[l]ᵀ`` times a matrix with one nonzero per selected entry, summed by
  ``embedding_bag`` with the entries grouped by feature (no ``(batch, d_features)`` gradient, no dense matmul);
- **decoder**: forward ``embedding_bag`` of the selected rows, backward the same kernel transposed for ``∂W_dec``
  and a sampled product for ``∂values`` (``cltlab.decoding``'s sparse kernels).

The losses and gradients equal the dense path's (``tests/test_selected.py``); ``CrossLayerTranscoder.loss`` takes
this path for ``decoding="sparse"``, and for ``"auto"`` on the CPU when k is under ``SPARSE_MAX_DENSITY`` of the
features.
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
        layer = torch.arange(len(self.counts), device=self.rows.device)
        return torch.repeat_interleave(layer, self.counts.to(self.rows.device))


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
        for layer, (r, c, g) in enumerate(_per_layer(counts, rows, cols, grad_values)):
            if grad_W is not None:  # ∂W[l][:, f] = Σ over the entries of f of ∂value · x[row, l]
                grad_W[layer] = bag_sum_transposed(r, c, g, x[:, layer].float().contiguous(), F).T
            if grad_b is not None:
                grad_b[layer].index_add_(0, c, g.to(grad_b.dtype))
        return None, grad_W, grad_b, None


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
            grad_W = bag_sum_transposed(r, c, v, g, W.shape[0]).to(W.dtype)
            scale = None if grad_norms is None else norm_gradient_scale(grad_norms, norms, source)
            grad_weights.append(add_norm_gradient(grad_W, W, scale))
        return grad_values, None, None, None, None, *grad_weights


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
