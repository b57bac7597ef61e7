"""Decoding features into the reconstruction, densely or from the active features only.

For source layer s the decoder is ``W_s`` of shape ``(d_features, n_targets · d_model)`` and its contribution to
the reconstruction is ``features[:, s] @ W_s``. With JumpReLU at a healthy sparsity almost every entry of
``features[:, s]`` is zero, so each source layer is decoded one of two ways, chosen per source and per batch:

- **dense**: ``addmm`` into the output (on the CPU block by block, one target layer at a time: ``decode_dense``);
  the backward pass is two more matmuls per source (``weight_gradient``).
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
BATCHED_GRADIENT_MAX_FEATURES = 512
"""Up to this many features per source the CPU computes a dense source's decoder gradient as one batch of
``(d_features, batch) @ (batch, d_model)`` blocks, one per target (``weight_gradient``): MKL gives each core whole
blocks, which beats splitting one wide product across the cores when the blocks are small (2-core AVX2 EPYC,
30 sources, batch 512, norms' share included: 64 features 235-315 against 318-426 ms, 256 features 847-930
against 964-1098 ms, 512 features 550-791 against 877-888 ms; equal or slower at 3072)."""


def bag_offsets(ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """``(n_bags + 1,)`` start of each bag in ``ids``, which is sorted by bag."""
    counts = torch.bincount(ids, minlength=n_bags)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def sampled_matmul(
    rows: torch.Tensor, cols: torch.Tensor, n: tuple[int, int], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``(a @ b)[rows, cols]`` in float32 without forming ``a @ b``; ``rows`` sorted ascending."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        pattern = torch.sparse_csr_tensor(
            bag_offsets(rows, n[0]),
            cols,
            torch.zeros(rows.numel(), dtype=torch.float32, device=a.device),
            size=n,
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, a, b, beta=0.0).values()


def bag_sum(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, W: torch.Tensor, n_rows: int):
    """``(n_rows, W.shape[1])``: row r is Σ ``values[i] · W[cols[i]]`` over the entries i with ``rows[i] == r``;
    ``rows`` sorted ascending. A sparse ``(n_rows, len(W))`` matrix times ``W``, by ``embedding_bag``."""
    return F.embedding_bag(
        cols, W, bag_offsets(rows, n_rows), mode="sum", per_sample_weights=values, include_last_offset=True
    )


def bag_sum_transposed(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, g: torch.Tensor, n_cols: int
):
    """``(n_cols, g.shape[1])``: the same sparse matrix, transposed, times ``g`` — the weight gradient of
    ``bag_sum`` (entries regrouped by column, ``g`` float32 and contiguous for the fast kernel)."""
    order = torch.argsort(cols, stable=True)
    return bag_sum(cols[order], rows[order], values[order].float(), g, n_cols)


def sampled_gradient(
    rows: torch.Tensor, cols: torch.Tensor, g: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """``(g @ W.T)[rows, cols]`` (float32): the gradient of ``bag_sum`` with respect to each entry's value.
    Computed as ``(W @ g.T)[cols, rows]``: that orientation runs faster than ``(batch, ...)``."""
    by_col = torch.argsort(cols, stable=True)
    sampled = sampled_matmul(cols[by_col], rows[by_col], (W.shape[0], g.shape[0]), W.float(), g.T)
    return torch.empty_like(sampled).index_copy_(0, by_col, sampled)


# Batches from which the CPU decodes target by target (``decode_dense``).
BY_TARGET_ROWS = 512


class Decode(torch.autograd.Function):
    """``Σ_s features[:, s] @ W_s``, each product written straight into its ``(batch, n_targets · d_model)`` slice.

    Inputs: ``features (batch, n_layers, d_features)`` in the compute dtype, ``needed`` — a bool tensor of the
    same shape saying where the caller needs ``∂/∂features`` (``None``: everywhere, all sources dense) — ``sparse``,
    one bool per source, and the decoder weights ``(d_features, n_targets, d_model)`` per source.
    Autograd's in-place ``out[:, a:b] += ...`` would cost a zero-filled full-size gradient copy per source in the
    backward pass; here every product reads and writes strided views instead.
    """

    @staticmethod
    def forward(ctx, features, needed, sparse, with_norms, *weights):
        batch, L, n_features = features.shape
        d = weights[0].shape[-1]
        out = torch.empty(batch, L * d, dtype=features.dtype, device=features.device)
        norms = decoder_norms(weights) if with_norms else features.new_empty(0)
        ctx.active = [None] * L  # (rows, cols, values) of the nonzero features of each sparse source
        ctx.needed = [None] * L  # (rows, cols) where the gradient is needed, per sparse source
        # the dense sources' weights in the compute dtype, kept for the backward pass: one cast per step
        casts = [W.to(features.dtype) for W, s in zip(weights, sparse, strict=True) if not s]
        with torch.autocast(features.device.type, enabled=False):
            decode_dense(features, sparse, casts, out.view(batch, L, d))
            for source, W in enumerate(weights):
                if not sparse[source]:
                    continue
                W = W.reshape(n_features, -1)
                rows, cols = features[:, source].nonzero(as_tuple=True)  # sorted by row
                values = features[:, source][rows, cols]
                out[:, source * d : source * d + W.shape[1]].add_(
                    bag_sum(rows, cols, values, W.to(features.dtype), batch)
                )
                ctx.active[source] = (rows, cols, values)
                ctx.needed[source] = needed[:, source].nonzero(as_tuple=True)
        ctx.save_for_backward(features, norms, *weights, *casts)
        ctx.sparse = sparse
        return out.view(batch, L, d), norms

    @staticmethod
    def backward(ctx, grad_out, grad_norms):
        features, norms, *saved = ctx.saved_tensors
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
            needs_weight = ctx.needs_input_grad[4 + source]
            norm_scale = (
                None
                if grad_norms is None or not norms.numel()
                else norm_gradient_scale(grad_norms, norms, source)
            )
            if not ctx.sparse[source]:
                flat = next(casts).reshape(n_features, -1)
                if grad_features is not None:
                    grad_features[:, source] = g @ flat.T
                grad_weights.append(
                    weight_gradient(features[:, source], g, W, norm_scale) if needs_weight else None
                )
                continue
            rows, cols, values = ctx.active[source]
            # One contiguous float32 copy of this source's gradient slice: both sparse kernels need contiguous
            # inputs (strided ones run 3-5x slower), the CPU's sampled_addmm takes float32 only.
            g = g.float().contiguous()
            if grad_features is not None and ctx.needed[source][0].numel():
                needed_rows, needed_cols = ctx.needed[source]
                sampled = sampled_gradient(needed_rows, needed_cols, g, flat)
                grad_features[:, source].index_put_((needed_rows, needed_cols), sampled.to(features.dtype))
            # ∂W[f] = Σ over the tokens where f fired of value · g[token]
            grad_W = (
                bag_sum_transposed(rows, cols, values, g, n_features).to(W.dtype) if needs_weight else None
            )
            grad_weights.append(add_norm_gradient(grad_W, W, norm_scale) if needs_weight else None)
        return grad_features, None, None, None, *grad_weights


def decode_dense(features, sparse, casts, out, *, by_target: bool | None = None) -> None:
    """Write the dense sources' products into ``out`` ``(batch, n_layers, d_model)``, uninitialized, zero where no
    dense source writes (the sparse sources add to it afterwards); ``casts``: the dense sources' weights.

    On the CPU, for batches of ``BY_TARGET_ROWS`` or more, one target at a time, ``out[:, t] = Σ features[:, s] @
    W_s[:, t − s]`` over the dense sources ``s ≤ t``: each target's ``(batch, d_model)`` sum stays in cache while
    its sources add to it, where one product per source, written across all its targets, streams the whole output
    through memory once per source (30 layers × 256 features, batch 512: 617 against 803 ms on an AVX2 2-core CPU;
    equal at 3072 features). Smaller batches, such as the end-to-end stage's local term (64 rows), and a GPU,
    where every product is a kernel launch, take one product per source (``by_target``: which; None: by device and
    batch). At 64 rows × 30 layers × 64 features in bf16, forward and backward: 37 against 53 ms on a 2-core
    AVX-512 CPU."""
    dense = [source for source, is_sparse in enumerate(sparse) if not is_sparse]
    if by_target is None:
        by_target = features.device.type == "cpu" and len(features) >= BY_TARGET_ROWS
    if not by_target:
        out.zero_()
        flat = out.view(len(out), -1)
        for source, W in zip(dense, casts, strict=True):
            d = W.shape[-1]
            flat[:, source * d : (source + W.shape[1]) * d].addmm_(features[:, source], W.flatten(1))
        return
    # per target: (a source's features, its (d_features, d_model) block)
    blocks = [[] for _ in range(out.shape[1])]
    for source, W in zip(dense, casts, strict=True):
        for i in range(W.shape[1]):
            blocks[source + i].append((features[:, source], W[:, i]))
    for target, products in enumerate(blocks):
        if not products:
            out[:, target].zero_()
        for i, (f, W) in enumerate(products):
            out[:, target].addmm_(f, W, beta=0 if i == 0 else 1)  # beta 0: the old contents are not read


def weight_gradient(
    features: torch.Tensor, g: torch.Tensor, W: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """∂loss/∂W of one dense source, shaped like ``W`` ``(d_features, n_targets, d_model)``: ``features.T @ g``
    from ``features (batch, d_features)`` and ``g (batch, n_targets · d_model)``, plus the decoder norms' share
    ``scale_f · W_f`` where ``scale`` is given (``add_norm_gradient``). With few features on the CPU the product is
    a batch of per-target blocks (``BATCHED_GRADIENT_MAX_FEATURES``), laid out as W by the pass that adds the
    norms' share."""
    batch, n_targets = len(g), W.shape[1]
    if features.device.type != "cpu" or features.shape[1] > BATCHED_GRADIENT_MAX_FEATURES:
        return add_norm_gradient((features.T @ g).to(W.dtype), W, scale)
    blocks = torch.bmm(features.T.expand(n_targets, -1, -1), g.view(batch, n_targets, -1).transpose(0, 1))
    by_feature = blocks.transpose(0, 1)  # (d_features, n_targets, d_model), strided
    if scale is None:
        return torch.empty_like(W).copy_(by_feature)
    return torch.addcmul(by_feature, W, scale[:, None, None].to(W.dtype), out=torch.empty_like(W))


def decoder_norms(weights) -> torch.Tensor:
    """``(n_layers, d_features)``: the norm of each feature's decoder vectors, all its targets together (inside
    ``Decode``'s forward, untracked; its backward adds their gradient itself)."""
    return torch.stack([torch.linalg.vector_norm(W.float(), dim=(1, 2)) for W in weights])  # no squared copy


def norm_gradient_scale(grad_norms: torch.Tensor, norms: torch.Tensor, source: int) -> torch.Tensor:
    """``(d_features,)``: ∂loss/∂‖W_f‖ ÷ ‖W_f‖ of one source, the factor of ``W_f`` in ∂loss/∂W_f (0 where the norm
    is 0, as autograd's norm backward gives)."""
    norm = norms[source]
    return torch.where(norm > 0, grad_norms[source] / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)


def add_norm_gradient(grad_W: torch.Tensor | None, W: torch.Tensor, scale: torch.Tensor | None):
    """``grad_W`` (``(d_features, n_targets · d_model)`` or None) plus the decoder norms' share ``scale_f · W_f``,
    shaped like ``W``. Added in place, and to the rows whose factor is nonzero alone when they are few (the
    sparsity penalty reaches only the features that fired): no full-size copy of ``W`` for the norms' gradient."""
    if scale is None:
        return None if grad_W is None else grad_W.view(W.shape)
    flat = W.reshape(W.shape[0], -1)
    if grad_W is None:
        grad_W = torch.zeros_like(flat)
    rows = scale.nonzero().flatten()
    if rows.numel() < 0.25 * len(scale):
        grad_W.index_add_(0, rows, flat[rows] * scale[rows, None].to(flat.dtype))
    else:
        grad_W.addcmul_(flat, scale[:, None].to(flat.dtype))
    return grad_W.view(W.shape)


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
    with_norms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(batch, n_layers, d_model)`` reconstruction of ``features`` through per-source ``weights``.

    ``needed`` (bool, like ``features``) marks where the caller's gradient flows back; required for ``sparse``
    and ``auto`` modes, since elsewhere ``∂/∂features`` is left at zero. ``with_norms``: also return the
    ``(n_layers, d_features)`` decoder norms, whose gradient the backward pass then adds to the decoder's own.
    """
    if mode not in ("dense", "sparse", "auto"):
        raise ValueError(f"decoding must be dense, sparse or auto, not {mode!r}.")
    if mode != "dense" and needed is None:
        raise ValueError("sparse decoding needs the mask of entries whose gradient is used (needed=...).")
    sparse = choose_sparse(needed, mode) if needed is not None else (False,) * features.shape[1]
    out, norms = Decode.apply(features, needed, sparse, with_norms, *weights)
    return (out, norms) if with_norms else out
