"""Decoding features into the reconstruction, densely or from the active features only.

For source layer s the decoder is ``W_s`` of shape ``(d_features, n_targets · d_model)`` and its contribution to
the reconstruction is ``features[:, s] @ W_s``. With JumpReLU at a healthy sparsity almost every entry of
``features[:, s]`` is zero, so each source layer is decoded one of two ways, chosen per source and per batch:

- **dense**: ``addmm`` into the source's slice of the output; the backward pass is two more matmuls.
- **sparse**: ``embedding_bag`` sums the decoder rows of the active features weighted by their activations
  (forward), and the same kernel with the roles swapped gives ``∂W_s`` (backward). The gradient with respect to
  the features is needed only where the activation function passes it on (active features, and for JumpReLU
  the pre-activations near θ whose threshold gets a pseudo-gradient); it is computed there alone, as a sampled
  dense-dense product (``torch.sparse.sampled_addmm``). Elsewhere it is left at zero, which the activation
  function's backward would have multiplied by zero anyway, so the gradients equal the dense path's.

In ``auto`` mode a source is decoded sparsely when the fraction of entries that need a gradient is below
``SPARSE_MAX_DENSITY`` (the crossover measured by ``benchmarks/train_speed.py``) and the features live on the
CPU. On a GPU the dense bf16 matmuls win at every size we measured (an H200, 12 layers × 8192 features at 2%
density: 70 ms per dense step against 285 ms sparse), so ``auto`` stays dense there; ``sparse`` still forces it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

SPARSE_MAX_DENSITY = 0.08
"""Largest fraction of ``(token, feature)`` entries needing a gradient at which sparse decoding is chosen."""


def _bag_offsets(ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """``(n_bags + 1,)`` start of each bag in ``ids``, which is sorted by bag."""
    counts = torch.bincount(ids, minlength=n_bags)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _sampled_matmul(
    rows: torch.Tensor, cols: torch.Tensor, n: tuple[int, int], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``(a @ b)[rows, cols]`` in float32 without forming ``a @ b``; ``rows`` sorted ascending."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        pattern = torch.sparse_csr_tensor(
            _bag_offsets(rows, n[0]),
            cols,
            torch.zeros(rows.numel(), dtype=torch.float32, device=a.device),
            size=n,
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, a, b, beta=0.0).values()


class Decode(torch.autograd.Function):
    """``Σ_s features[:, s] @ W_s``, each product written straight into its ``(batch, n_targets · d_model)`` slice.

    Inputs: ``features (batch, n_layers, d_features)`` in the compute dtype, ``needed`` — a bool tensor of the
    same shape saying where the caller needs ``∂/∂features`` (``None``: everywhere, all sources dense) — ``sparse``,
    one bool per source, and the decoder weights ``(d_features, n_targets, d_model)`` per source.
    Autograd's in-place ``out[:, a:b] += ...`` would cost a zero-filled full-size gradient copy per source in the
    backward pass; here every product reads and writes strided views instead.
    """

    @staticmethod
    def forward(ctx, features, needed, sparse, *weights):
        batch, L, n_features = features.shape
        d = weights[0].shape[-1]
        out = torch.zeros(batch, L * d, dtype=features.dtype, device=features.device)
        ctx.active = [None] * L  # (rows, cols, values) of the nonzero features of each sparse source
        ctx.needed = [None] * L  # (rows, cols) where the gradient is needed, per sparse source
        casts = []  # the dense sources' weights in the compute dtype
        with torch.autocast(features.device.type, enabled=False):
            for source, W in enumerate(weights):
                W = W.reshape(n_features, -1)
                target = out[:, source * d : source * d + W.shape[1]]
                if not sparse[source]:
                    cast = W.to(features.dtype)  # kept for the backward pass: one cast per step
                    target.addmm_(features[:, source], cast)
                    casts.append(cast)
                    continue
                rows, cols = features[:, source].nonzero(as_tuple=True)  # sorted by row
                values = features[:, source][rows, cols]
                target.add_(
                    F.embedding_bag(
                        cols,
                        W.to(features.dtype),
                        _bag_offsets(rows, batch),
                        mode="sum",
                        per_sample_weights=values,
                        include_last_offset=True,
                    )
                )
                ctx.active[source] = (rows, cols, values)
                ctx.needed[source] = needed[:, source].nonzero(as_tuple=True)
        ctx.save_for_backward(features, *weights, *casts)
        ctx.sparse = sparse
        return out.view(batch, L, d)

    @staticmethod
    def backward(ctx, grad_out):
        features, *saved = ctx.saved_tensors
        batch, L, n_features = features.shape
        weights, casts = saved[:L], iter(saved[L:])
        d = grad_out.shape[-1]
        grad = grad_out.reshape(batch, L * d).to(features.dtype)
        grad_features = torch.zeros_like(features) if ctx.needs_input_grad[0] else None
        grad_weights = []
        for source, W in enumerate(weights):
            flat = W.reshape(n_features, -1)
            g = grad[
                :, source * d : source * d + flat.shape[1]
            ]  # (batch, n_targets · d_model), a strided view
            needs_weight = ctx.needs_input_grad[3 + source]
            if not ctx.sparse[source]:
                flat = next(casts).reshape(n_features, -1)
                if grad_features is not None:
                    grad_features[:, source] = g @ flat.T
                grad_weights.append(
                    (features[:, source].T @ g).to(W.dtype).view(W.shape) if needs_weight else None
                )
                continue
            rows, cols, values = ctx.active[source]
            # One contiguous float32 copy of this source's gradient slice: both sparse kernels need contiguous
            # inputs (strided ones run 3-5x slower), the CPU's sampled_addmm takes float32 only.
            g = g.float().contiguous()
            if grad_features is not None and ctx.needed[source][0].numel():
                needed_rows, needed_cols = ctx.needed[source]
                by_feature = torch.argsort(needed_cols, stable=True)
                needed_rows, needed_cols = needed_rows[by_feature], needed_cols[by_feature]
                # (W_s @ g.T)[feature, token]: the (d_features, batch) orientation runs faster than (batch, ...)
                sampled = _sampled_matmul(needed_cols, needed_rows, (n_features, batch), flat.float(), g.T)
                grad_features[:, source].index_put_((needed_rows, needed_cols), sampled.to(features.dtype))
            if needs_weight:  # ∂W[f] = Σ over the tokens where f fired of value · g[token]: bags by feature
                order = torch.argsort(cols, stable=True)
                grad_W = F.embedding_bag(
                    rows[order],
                    g,
                    _bag_offsets(cols[order], n_features),
                    mode="sum",
                    per_sample_weights=values[order].float(),
                    include_last_offset=True,
                )
                grad_weights.append(grad_W.to(W.dtype).view(W.shape))
            else:
                grad_weights.append(None)
        return grad_features, None, None, *grad_weights


def choose_sparse(needed: torch.Tensor, mode: str) -> tuple[bool, ...]:
    """One bool per source layer: decode it sparsely? ``needed`` is ``(batch, n_layers, d_features)`` bool."""
    L = needed.shape[1]
    if mode == "dense":
        return (False,) * L
    if mode == "sparse":
        return (True,) * L
    if needed.device.type != "cpu":
        return (False,) * L
    density = needed.float().mean((0, 2)).tolist()  # one host sync per step
    return tuple(rho < SPARSE_MAX_DENSITY for rho in density)


def decode(
    features: torch.Tensor,
    weights: list[torch.Tensor],
    *,
    needed: torch.Tensor | None = None,
    mode: str = "dense",
) -> torch.Tensor:
    """``(batch, n_layers, d_model)`` reconstruction of ``features`` through per-source ``weights``.

    ``needed`` (bool, like ``features``) marks where the caller's gradient flows back; required for ``sparse``
    and ``auto`` modes, since elsewhere ``∂/∂features`` is left at zero.
    """
    if mode not in ("dense", "sparse", "auto"):
        raise ValueError(f"decoding must be dense, sparse or auto, not {mode!r}.")
    if mode != "dense" and needed is None:
        raise ValueError("sparse decoding needs the mask of entries whose gradient is used (needed=...).")
    sparse = choose_sparse(needed, mode) if needed is not None else (False,) * features.shape[1]
    return Decode.apply(features, needed, sparse, *weights)
