"""Sparse decoding: the same reconstruction, loss and gradients as dense decoding, chosen per source layer."""

from __future__ import annotations

import pytest
import torch
from helpers import make_clt

from cltlab import decoding

L, D, F = 4, 8, 32


def inputs(clt, batch: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, clt.n_layers, clt.d_model, generator=generator) * clt.input_scale + clt.input_mean
    y = torch.randn(batch, clt.n_layers, clt.d_model, generator=generator)
    return x, y


def loss_and_grads(clt, x, y, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    clt.zero_grad(set_to_none=True)
    out = clt.loss(x, y, sparsity_coef=1e-2, preact_coef=1e-2, decoding=mode)
    out.total.backward()
    return out.total.item(), {
        name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("cross_layer", [True, False])
def test_sparse_decoding_gives_the_dense_loss_and_gradients(activation, cross_layer):
    clt = make_clt(
        L, D, F, cross_layer=cross_layer, activation_kind=activation, k=3, threshold_init=0.3
    ).train()
    x, y = inputs(clt)
    dense_loss, dense = loss_and_grads(clt, x, y, "dense")
    for mode in ("sparse", "auto"):
        loss, grads = loss_and_grads(clt, x, y, mode)
        assert loss == pytest.approx(dense_loss, rel=1e-6)
        assert grads.keys() == dense.keys()
        for name, grad in dense.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{mode} ∂{name}")
    if activation == "jumprelu":  # θ gets a pseudo-gradient from features just below it, which are zero
        assert dense["activation.log_threshold"].abs().sum() > 0
        pre = clt.preactivations(x)
        theta = clt.activation.threshold
        assert ((pre <= theta) & (pre > theta - clt.activation.bandwidth / 2)).any()


def test_sparse_decoding_of_features_with_no_active_entries():
    clt = make_clt(L, D, F).train()
    features = torch.zeros(5, L, F, requires_grad=True)
    needed = torch.zeros(5, L, F, dtype=torch.bool)
    out = decoding.decode(features, list(clt.W_dec), needed=needed, mode="sparse")
    assert torch.equal(out, torch.zeros(5, L, D))
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros(5, L, F))
    assert all(torch.equal(W.grad, torch.zeros_like(W)) for W in clt.W_dec)


def test_sparse_decoding_under_bf16_autocast_matches_dense():
    clt = make_clt(L, D, F, threshold_init=0.3).train()
    x, y = inputs(clt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = clt.loss(x, y, sparsity_coef=1e-2, decoding="dense")
        sparse = clt.loss(x, y, sparsity_coef=1e-2, decoding="sparse")
    assert sparse.total.item() == pytest.approx(dense.total.item(), rel=2e-2)
    torch.testing.assert_close(sparse.nmse, dense.nmse, rtol=2e-2, atol=1e-3)


def test_auto_decoding_picks_sparse_for_the_sources_where_few_entries_need_a_gradient():
    needed = torch.zeros(100, 3, 50, dtype=torch.bool)
    needed[:, 0, :2] = True  # 4% of source 0's entries
    needed[:, 1, :25] = True  # 50% of source 1's
    assert decoding.choose_sparse(needed, "auto") == (True, False, True)
    assert decoding.choose_sparse(needed, "dense") == (False, False, False)
    assert decoding.choose_sparse(needed, "sparse") == (True, True, True)


@pytest.mark.parametrize("sparse", [(False,) * L, (True, False, True, False), (True,) * L])
@pytest.mark.parametrize("cross_layer", [True, False])
@pytest.mark.parametrize("by_target", [True, False])  # the CPU's order; a GPU's
def test_decoding_never_reads_the_memory_it_starts_from(sparse, cross_layer, by_target, monkeypatch):
    clt = make_clt(L, D, F, cross_layer=cross_layer, threshold_init=0.3)
    features = clt.encode(inputs(clt)[0]).detach()
    weights = [W.detach() for W in clt.W_dec]
    expected = torch.zeros(len(features), L, D)
    for source, W in enumerate(weights):
        for i in range(W.shape[1]):
            expected[:, source + i] += features[:, source] @ W[:, i]
    needed = features > 0
    monkeypatch.setattr(decoding, "choose_sparse", lambda needed, mode: sparse)
    real_decode_dense = decoding.decode_dense
    monkeypatch.setattr(decoding, "decode_dense", lambda *a: real_decode_dense(*a, by_target=by_target))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: real_empty(*shape, **kw).fill_(torch.nan))
    out = decoding.decode(features, weights, needed=needed, mode="auto")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decoding_mode_errors():
    clt = make_clt(L, D, F)
    features = torch.zeros(2, L, F)
    with pytest.raises(ValueError, match="decoding must be dense, sparse or auto, not 'fast'"):
        decoding.decode(features, list(clt.W_dec), mode="fast")
    with pytest.raises(ValueError, match="sparse decoding needs the mask of entries whose gradient is used"):
        decoding.decode(features, list(clt.W_dec), mode="sparse")


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_decoded_sparsely_never_forms_the_dense_features(activation, monkeypatch):
    clt = make_clt(
        L, D, F, activation_kind=activation, k=2
    ).train()  # 2 of 32 kept: auto takes the sparse path
    x, y = inputs(clt)
    dense_loss, dense = loss_and_grads(clt, x, y, "dense")
    dense_out = clt.loss(x, y, sparsity_coef=1e-2, decoding="dense")

    def dense_features(*args, **kwargs):
        raise AssertionError("the selected path formed the dense (batch, d_features) activations")

    monkeypatch.setattr(type(clt.activation), "forward", dense_features)
    monkeypatch.setattr(clt, "preactivations", dense_features)
    loss, grads = loss_and_grads(clt, x, y, "auto")
    assert loss == pytest.approx(dense_loss, rel=1e-6)
    for name, grad in dense.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"∂{name}")
    out = clt.loss(x, y, sparsity_coef=1e-2, decoding="auto")
    torch.testing.assert_close(out.l0, dense_out.l0)
    assert torch.equal(out.active, dense_out.active) and out.active.any()
    if activation == "topk":
        assert torch.equal(out.l0, torch.full((L,), 2.0))  # every random pre-activation row has 2 positives


def test_a_zero_sparsity_coefficient_measures_the_term_without_its_gradient():
    clt = make_clt(L, D, F, activation_kind="topk", k=2).train()
    x, y = inputs(clt)
    out = clt.loss(x, y, sparsity_coef=0.0, preact_coef=0.0, decoding="auto")
    with_term = clt.loss(x, y, sparsity_coef=1e-2, preact_coef=0.0, decoding="auto")
    assert out.sparsity.item() == pytest.approx(with_term.sparsity.item()) and out.sparsity > 0
    assert out.total.item() == pytest.approx(out.mse.item())
    out.total.backward()
    mse_only = make_clt(L, D, F, activation_kind="topk", k=2).train()
    mse_only.loss(x, y, sparsity_coef=0.0, decoding="dense").mse.backward()
    for (name, p), q in zip(clt.named_parameters(), mse_only.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def reference_loss(clt, x, y, sparsity_coef: float, preact_coef: float) -> torch.Tensor:
    """The loss written with plain autograd ops: decoder norms by ``vector_norm``, the decoder as a loop of matmuls."""
    pre = clt.preactivations(x)
    features = clt.activation(pre)
    recon = torch.zeros_like(x) + clt.b_dec
    for source, W in enumerate(clt.W_dec):
        for i in range(W.shape[1]):
            target = source + i if clt.config.cross_layer else source
            recon[:, target] = recon[:, target] + features[:, source] @ W[:, i]
    target = (y - clt.output_mean) / clt.output_scale
    norms = torch.stack([torch.linalg.vector_norm(W, dim=(1, 2)) for W in clt.W_dec])
    sparsity = torch.tanh(4.0 * norms * features).sum((1, 2)).mean()
    preact = clt.activation.preact_loss(pre, norms)
    return (recon - target).pow(2).mean() + sparsity_coef * sparsity + preact_coef * preact


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_the_decoder_norms_gradient_joined_in_place_equals_autograds(activation, mode):
    clt = make_clt(L, D, F, activation_kind=activation, k=2, threshold_init=0.3).train()
    x, y = inputs(clt)
    for coefs in [(1e-1, 1e-1), (1e-1, 0.0), (0.0, 1e-1)]:
        clt.zero_grad(set_to_none=True)
        reference_loss(clt, x, y, *coefs).backward()
        expected = {name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None}
        loss, grads = loss_and_grads_with(clt, x, y, mode, *coefs)
        for name, grad in expected.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{mode} ∂{name} at {coefs}"
            )


def loss_and_grads_with(clt, x, y, mode, sparsity_coef, preact_coef):
    clt.zero_grad(set_to_none=True)
    out = clt.loss(x, y, sparsity_coef=sparsity_coef, preact_coef=preact_coef, decoding=mode)
    out.total.backward()
    return out.total.item(), {
        name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("n_nonzero", [0, 2, 32])  # none, few (index_add of those rows), all (addcmul)
def test_add_norm_gradient_adds_scale_times_each_row(n_nonzero):
    generator = torch.Generator().manual_seed(n_nonzero)
    W = torch.randn(32, 3, D, generator=generator)
    grad = torch.randn(32, 3 * D, generator=generator)
    scale = torch.zeros(32)
    scale[torch.randperm(32, generator=generator)[:n_nonzero]] = torch.randn(n_nonzero, generator=generator)
    expected = grad.view(W.shape) + scale[:, None, None] * W
    torch.testing.assert_close(decoding.add_norm_gradient(grad.clone(), W, scale), expected)
    torch.testing.assert_close(decoding.add_norm_gradient(None, W, scale), scale[:, None, None] * W)


def sparse_jumprelu(batch: int = 400, fraction: float = 0.03):
    """A JumpReLU CLT whose thresholds let about ``fraction`` of each layer's entries through, as trained ones
    do, with the kernel narrow enough that auto decoding takes the entries path; and a batch."""
    clt = make_clt(L, D, F, threshold_init=0.3).train()
    clt.activation.bandwidth = 0.02
    x, y = inputs(clt, batch=batch)
    with torch.no_grad():
        pre = clt.preactivations(x).transpose(0, 1).flatten(1)
        theta = torch.quantile(pre, 1 - fraction, dim=1)
        clt.activation.log_threshold.copy_(theta.log()[:, None].expand(L, F))
    return clt, x, y


def test_a_sparse_jumprelu_steps_from_its_entries_with_the_dense_loss_and_gradients(monkeypatch):
    clt, x, y = sparse_jumprelu()
    pre, theta = clt.preactivations(x), clt.activation.threshold
    near = (pre > theta - clt.activation.bandwidth / 2) & (pre <= theta)
    assert near.any()  # entries whose only gradient is θ's
    dense_loss, dense = loss_and_grads(clt, x, y, "dense")
    dense_out = clt.loss(x, y, sparsity_coef=1e-2, preact_coef=1e-2, decoding="dense")

    def dense_path(*args, **kwargs):
        raise AssertionError("the entries path ran the dense JumpReLU or decoder")

    monkeypatch.setattr(type(clt.activation), "forward", dense_path)
    monkeypatch.setattr(decoding.Decode, "apply", dense_path)
    loss, grads = loss_and_grads(clt, x, y, "auto")
    assert loss == pytest.approx(dense_loss, rel=1e-6)
    assert grads.keys() == dense.keys()
    for name, grad in dense.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"∂{name}")
    out = clt.loss(x, y, sparsity_coef=1e-2, preact_coef=1e-2, decoding="auto")
    for field in ("mse", "sparsity", "preact", "nmse", "l0"):
        torch.testing.assert_close(getattr(out, field), getattr(dense_out, field), msg=field)
    assert torch.equal(out.active, dense_out.active)


@pytest.mark.parametrize("fraction", [0.03, 0.5])  # the entries path, and auto's dense fallback
def test_jumprelu_entries_and_fallback_give_the_input_gradient(fraction):
    clt, x, y = sparse_jumprelu(fraction=fraction)
    grads = {}
    for mode in ("dense", "auto"):
        x_ = x.clone().requires_grad_()
        clt.loss(x_, y, sparsity_coef=1e-2, preact_coef=1e-2, decoding=mode).total.backward()
        grads[mode] = x_.grad
    torch.testing.assert_close(grads["auto"], grads["dense"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n_features", [8, decoding.BATCHED_GRADIENT_MAX_FEATURES + 1])
@pytest.mark.parametrize("with_scale", [False, True])
def test_the_weight_gradient_is_features_transposed_times_g_plus_the_norms_share(n_features, with_scale):
    generator = torch.Generator().manual_seed(n_features)
    features = torch.randn(40, 3, n_features, generator=generator)[
        :, 1
    ]  # a strided source slice, as in Decode
    grad = torch.randn(40, 7 * D, generator=generator)
    g = grad[:, 2 * D :]  # this source's 5 targets, strided
    W = torch.randn(n_features, 5, D, generator=generator)
    scale = torch.randn(n_features, generator=generator) if with_scale else None
    out = decoding.weight_gradient(features, g, W, scale)
    assert out.shape == W.shape and out.is_contiguous()
    expected = (features.T @ g).view(W.shape)
    if with_scale:
        expected = expected + scale[:, None, None] * W
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
