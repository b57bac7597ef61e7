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


def test_decoding_mode_errors():
    clt = make_clt(L, D, F)
    features = torch.zeros(2, L, F)
    with pytest.raises(ValueError, match="decoding must be dense, sparse or auto, not 'fast'"):
        decoding.decode(features, list(clt.W_dec), mode="fast")
    with pytest.raises(ValueError, match="sparse decoding needs the mask of entries whose gradient is used"):
        decoding.decode(features, list(clt.W_dec), mode="sparse")
