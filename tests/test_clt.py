"""CrossLayerTranscoder: shapes, causality, per-layer paths, loss formulas, training signal, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_clt

from cltlab import CrossLayerTranscoder
from cltlab.clt import LayerDecoder
from cltlab.config import CLTConfig

L, D, F = 4, 8, 16


def raw_inputs(clt: CrossLayerTranscoder, batch: int = 32, seed: int = 0) -> torch.Tensor:
    """Raw ``(batch, n_layers, d_model)`` activations around the CLT's input normalization."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, clt.n_layers, clt.d_model, generator=generator)
    return x * clt.input_scale + clt.input_mean


def test_parameter_shapes():
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, d_features=F))
    assert clt.W_enc.shape == (L, D, F)
    assert clt.b_enc.shape == (L, F)
    assert clt.b_dec.shape == (L, D)
    assert [tuple(W.shape) for W in clt.W_dec] == [(F, L - source, D) for source in range(L)]
    assert clt.activation.threshold.shape == (L, F)
    assert torch.allclose(clt.activation.threshold, torch.full((L, F), 0.1))
    plt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, d_features=F, cross_layer=False))
    assert [tuple(W.shape) for W in plt.W_dec] == [(F, 1, D)] * L


def test_forward_shapes_and_features_are_jumprelu_of_preactivations():
    clt = make_clt(L, D, F)
    out = clt(raw_inputs(clt, batch=5))
    assert out.features.shape == (5, L, F)
    assert out.preactivations.shape == (5, L, F)
    assert out.reconstruction.shape == (5, L, D)
    theta = clt.activation.threshold
    assert torch.equal(out.features, out.preactivations * (out.preactivations > theta))
    # Some but not all features fire: the tests below are not about an all-zero code.
    active = (out.features > 0).float().mean()
    assert 0.05 < active < 0.95


def test_wrong_input_shape_is_a_clear_error():
    clt = make_clt(L, D, F)
    with pytest.raises(
        ValueError, match=r"resid_mid must have shape \(batch, n_layers=4, d_model=8\), got \(5, 3, 8\)"
    ):
        clt(torch.zeros(5, 3, D))
    with pytest.raises(ValueError, match="mlp_out must have shape"):
        clt.loss(torch.zeros(5, L, D), torch.zeros(5, L, D + 1), sparsity_coef=0.0)


def test_preactivations_apply_input_normalization():
    clt = make_clt(L, D, F)
    x = raw_inputs(clt, batch=6)
    normalized = (x - clt.input_mean) / clt.input_scale
    expected = torch.stack([normalized[:, i] @ clt.W_enc[i] + clt.b_enc[i] for i in range(L)], 1)
    assert torch.allclose(clt.preactivations(x), expected, atol=1e-5)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_reconstruction_matches_explicit_sum_over_sources(cross_layer):
    clt = make_clt(L, D, F, cross_layer=cross_layer)
    f = clt.encode(raw_inputs(clt, batch=6))
    expected = []
    for target in range(L):
        y = clt.b_dec[target].clone()
        sources = range(target + 1) if cross_layer else [target]
        for source in sources:
            y = y + f[:, source] @ clt.W_dec[source][:, target - source]
        expected.append(y * clt.output_scale[target] + clt.output_mean[target])
    assert torch.allclose(clt.decode(f), torch.stack(expected, 1), atol=1e-5)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_layerwise_encode_and_decode_agree_with_forward(cross_layer):
    clt = make_clt(L, D, F, cross_layer=cross_layer)
    x = raw_inputs(clt, batch=6)
    out = clt(x)
    for layer in range(L):
        assert torch.allclose(clt.encode_layer(x[:, layer], layer), out.features[:, layer], atol=1e-6)
        assert torch.allclose(clt.decode_layer(out.features, layer), out.reconstruction[:, layer], atol=1e-5)


@pytest.mark.parametrize("cross_layer", [True, False])
@pytest.mark.parametrize("bf16", [False, True])  # bf16: under autocast, as the end-to-end stage runs it
def test_layer_decoder_gives_decode_layers_values_and_gradients(cross_layer, bf16):
    clt = make_clt(L, D, F, cross_layer=cross_layer)
    x = raw_inputs(clt, batch=6)
    weights = torch.randn(L, D)  # a different loss weight per layer and channel

    def close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
        # bf16 products, summed in another order: within 3% of the reference's largest entry
        return torch.allclose(a, b, atol=3e-2 * b.abs().max().item() if bf16 else atol)

    def run(decode_pass):
        clt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = list(decode_pass())
            sum((out.float() * weights[layer]).sum() for layer, out in enumerate(outputs)).backward()
        grads = [p.grad.clone() for p in clt.parameters() if p.grad is not None]
        assert all(grad.dtype == torch.float32 for grad in grads)  # the weights' own dtype
        return torch.stack(outputs, 1).float(), grads

    def per_pair():
        features = []
        for layer in range(L):
            features.append(clt.encode_layer(x[:, layer], layer))
            yield clt.decode_layer(features, layer)

    def per_target():
        decoder = LayerDecoder(clt)
        for layer in range(L):
            yield decoder.add(clt.encode_layer(x[:, layer], layer))

    expected, expected_grads = run(per_pair)
    values, grads = run(per_target)
    assert close(values, clt(x).reconstruction, 1e-5)
    assert close(values, expected, 1e-5)
    assert len(grads) == len(expected_grads) == 3 + L  # W_enc, b_enc, each W_dec, b_dec (θ gets none here)
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert close(grad, reference, 1e-4)


def test_layer_decoder_refuses_a_layer_past_the_last():
    clt = make_clt(L, D, F)
    decoder = LayerDecoder(clt)
    for _ in range(L):
        decoder.add(torch.zeros(2, F))
    with pytest.raises(ValueError, match=f"All {L} layers of the CLT were already added"):
        decoder.add(torch.zeros(2, F))


def test_decode_layer_ignores_later_sources():
    clt = make_clt(L, D, F)
    f = clt.encode(raw_inputs(clt, batch=4))
    garbage = f.clone()
    garbage[:, 2:] = 1e3
    assert torch.equal(clt.decode_layer(garbage, 1), clt.decode_layer(f, 1))


@pytest.mark.parametrize("layer", range(L))
def test_clt_is_causal_across_layers(layer):
    clt = make_clt(L, D, F)
    x = raw_inputs(clt, batch=16)
    changed = x.clone()
    changed[:, layer] += torch.randn(16, D, generator=torch.Generator().manual_seed(9)) * 3
    before, after = clt(x).reconstruction, clt(changed).reconstruction
    assert torch.equal(after[:, :layer], before[:, :layer])
    assert not torch.allclose(after[:, layer], before[:, layer], atol=1e-3)
    if layer + 1 < L:  # and a feature of layer l does write to later layers
        assert not torch.allclose(after[:, layer + 1 :], before[:, layer + 1 :], atol=1e-3)


@pytest.mark.parametrize("layer", range(L))
def test_per_layer_transcoder_changes_only_its_layer(layer):
    plt = make_clt(L, D, F, cross_layer=False)
    x = raw_inputs(plt, batch=16)
    changed = x.clone()
    changed[:, layer] += torch.randn(16, D, generator=torch.Generator().manual_seed(9)) * 3
    before, after = plt(x).reconstruction, plt(changed).reconstruction
    others = [i for i in range(L) if i != layer]
    assert torch.equal(after[:, others], before[:, others])
    assert not torch.allclose(after[:, layer], before[:, layer], atol=1e-3)


def test_set_normalization_reshapes_and_validates():
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=3, d_features=4))
    clt.set_normalization(torch.arange(6.0), torch.tensor([2.0, 3.0]), torch.ones(2, 3), [[4.0], [5.0]])
    assert torch.equal(clt.input_mean, torch.arange(6.0).view(2, 3))
    assert torch.equal(clt.input_scale, torch.tensor([[2.0], [3.0]]))
    assert torch.equal(clt.output_scale, torch.tensor([[4.0], [5.0]]))
    with pytest.raises(RuntimeError):
        clt.set_normalization(torch.zeros(5), torch.ones(2), torch.zeros(2, 3), torch.ones(2))


def test_decoder_norms_concatenate_all_targets():
    clt = make_clt(L, D, F)
    norms = clt.decoder_norms()
    assert norms.shape == (L, F)
    for source in range(L):
        expected = clt.W_dec[source].reshape(F, -1).norm(dim=1)
        assert torch.allclose(norms[source], expected, atol=1e-6)


def test_loss_terms_follow_their_formulas():
    clt = make_clt(L, D, F)
    x = raw_inputs(clt, batch=32, seed=1)
    y = (
        raw_inputs(clt, batch=32, seed=2) * clt.output_scale / clt.input_scale
    )  # any targets of the right shape
    lam, c, mu = 0.01, 4.0, 0.003
    out = clt.loss(x, y, sparsity_coef=lam, sparsity_c=c, preact_coef=mu)

    pre = clt.preactivations(x)
    f = clt.encode(x)
    recon = clt.decode_normalized(f)
    target = (y - clt.output_mean) / clt.output_scale
    err = (recon - target).pow(2)
    norms = clt.decoder_norms()
    theta = clt.activation.threshold
    sparsity = torch.tanh(c * norms * f).sum((1, 2)).mean()
    preact = (torch.relu(theta - pre) * norms).sum((1, 2)).mean()
    assert torch.allclose(out.mse, err.mean(), atol=1e-6)
    assert torch.allclose(out.sparsity, sparsity, rtol=1e-5)
    assert torch.allclose(out.preact, preact, rtol=1e-5)
    assert torch.allclose(out.total, err.mean() + lam * sparsity + mu * preact, rtol=1e-5)

    # NMSE per layer: Σ over tokens and d_model of the squared error ÷ Σ (target − its batch mean)².
    nmse = [err[:, i].sum() / (target[:, i] - target[:, i].mean(0)).pow(2).sum() for i in range(L)]
    assert out.nmse.shape == (L,)
    assert torch.allclose(out.nmse, torch.stack(nmse), rtol=1e-5)
    assert torch.allclose(out.l0, (f > 0).sum(-1).float().mean(0))
    assert torch.equal(out.active, (f > 0).any(0))


def test_residual_layer_weighting_scales_each_layers_squared_error():
    clt = make_clt(L, D, F)
    clt.set_normalization(
        clt.input_mean,
        torch.tensor([0.1, 2.0, 4.0, 4.0]),
        clt.output_mean,
        torch.tensor([1.6, 1.0, 1.0, 8.0]),
    )
    assert clt.layer_weights("uniform") is None
    weights = clt.layer_weights("residual")
    ratio = torch.tensor([16.0, 0.5, 0.25, 2.0])
    assert torch.allclose(weights, ratio / ratio.mean())  # mlp_out scale ÷ resid_mid scale, mean 1
    x, y = raw_inputs(clt, seed=1), raw_inputs(clt, seed=2)
    plain = clt.loss(x, y, sparsity_coef=0.0)
    weighted = clt.loss(x, y, sparsity_coef=0.0, layer_weights=weights)
    target = (y - clt.output_mean) / clt.output_scale
    per_layer = (clt.decode_normalized(clt.encode(x)) - target).pow(2).mean((0, 2))  # (L,)
    assert torch.allclose(weighted.mse, (per_layer * weights).mean(), rtol=1e-5)
    assert torch.allclose(plain.mse, per_layer.mean(), rtol=1e-5)
    assert torch.equal(weighted.nmse, plain.nmse)  # the reported NMSE is unweighted


def test_layer_weighting_is_checked():
    from cltlab.config import LossConfig

    with pytest.raises(ValueError, match="layer_weighting must be uniform or residual, not 'squared'"):
        LossConfig(layer_weighting="squared")


def test_perfect_reconstruction_has_zero_nmse():
    clt = make_clt(L, D, F)
    x = raw_inputs(clt, batch=16)
    y = clt(x).reconstruction.detach()
    out = clt.loss(x, y, sparsity_coef=0.0)
    assert out.nmse.max() < 1e-8
    assert out.mse < 1e-10


# one block; blocks of 3 rows (the last one short)
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 3 * L * D * 4])
def test_summed_variance_is_as_precise_as_torch_var(monkeypatch, chunk_bytes):
    from cltlab import jumprelu
    from cltlab.clt import summed_variance

    monkeypatch.setattr(jumprelu, "CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(3)
    # a mean 1000× the spread: the sum of squares minus the squared sum would lose every digit here
    target = torch.randn(64, L, D, generator=generator) * torch.rand(L, 1, generator=generator) + 1000.0
    exact = target.double().var(0, correction=0).sum(-1) * len(target)
    got = summed_variance(target)
    assert got.shape == (L,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)


def test_nmse_divides_by_the_targets_variance():
    clt = make_clt(L, D, F)
    x, y = raw_inputs(clt, batch=16), raw_inputs(clt, batch=16, seed=1)
    out = clt.loss(x, y, sparsity_coef=0.0)
    recon = clt(x).reconstruction.detach()
    target = (y - clt.output_mean) / clt.output_scale
    normalized = (recon - clt.output_mean) / clt.output_scale
    expected = (normalized - target).pow(2).sum((0, 2)) / target.var(0, correction=0).sum(-1) / 16
    torch.testing.assert_close(out.nmse, expected, rtol=1e-4, atol=1e-6)


def test_adam_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    clt = make_clt(L, D, 32, normalization=False, threshold_init=0.05)
    x = torch.randn(128, L, D)
    # Targets that a CLT can fit: a fixed linear function of the inputs of this and earlier layers.
    mix = torch.randn(L, D, D) / D**0.5
    y = torch.einsum("bld,lde->ble", x.cumsum(1), mix)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = clt.loss(x, y, sparsity_coef=1e-4)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.5 * losses[0]
    assert out.nmse.mean() < 0.8
    # Every parameter, thresholds included, received a gradient.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clt.parameters())


@pytest.mark.parametrize("cross_layer", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, cross_layer):
    clt = make_clt(L, D, F, cross_layer=cross_layer, layer_offset=2)
    assert not torch.equal(clt.input_scale, torch.ones(L, 1))  # normalization really is non-trivial
    directory = clt.save(tmp_path / "clt")
    assert directory == tmp_path / "clt"
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((directory / "config.json").read_text())
    assert meta["format"] == "cltlab.clt" and meta["format_version"] == 1
    assert meta["config"]["cross_layer"] is cross_layer and meta["config"]["layer_offset"] == 2

    loaded = CrossLayerTranscoder.load(directory)
    assert loaded.config == clt.config
    original, restored = clt.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = raw_inputs(clt, batch=8)
    a, b = clt(x), loaded(x)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.reconstruction, b.reconstruction)


def test_load_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no_such_clt"
    with pytest.raises(
        FileNotFoundError, match=r"no_such_clt is not a saved CLT.*config\.json and model\.safetensors"
    ):
        CrossLayerTranscoder.load(missing)


def test_load_refuses_another_format_version(tmp_path):
    directory = make_clt(L, D, F).save(tmp_path / "clt")
    meta = json.loads((directory / "config.json").read_text())
    meta["format_version"] = 99
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json has format 'cltlab\.clt' version 99"):
        CrossLayerTranscoder.load(directory)
