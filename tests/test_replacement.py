"""Replacement model: exact with error terms, equal to a plain-hook implementation, and its evaluation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import hooked_sites, make_clt, random_ids

from cltlab import HeldOut, ReplacementModel, evaluate
from cltlab.config import EvalConfig
from cltlab.corpus import token_sequences
from cltlab.models import LoadedModel
from cltlab.sites import trace_sites

ATOL = 1e-4


def clt_for(
    model: LoadedModel,
    *,
    layer_offset: int = 0,
    n_layers: int | None = None,
    d_features: int = 24,
    cross_layer: bool = True,
    seed: int = 0,
):
    """A random CLT sized for ``model``, normalized with statistics of the model's own activations."""
    n_layers = n_layers or model.n_layers - layer_offset
    clt = make_clt(
        n_layers,
        model.d_model,
        d_features,
        cross_layer=cross_layer,
        layer_offset=layer_offset,
        seed=seed,
        normalization=False,
        threshold_init=0.05,
    )
    layers = range(layer_offset, layer_offset + n_layers)
    resid, mlp = hooked_sites(model, random_ids(model, 4, 16, seed=99), layers)
    resid, mlp = resid[:, 1:].flatten(0, 1), mlp[:, 1:].flatten(0, 1)  # (tokens, n_layers, d_model)

    def scale(x):
        return (x - x.mean(0)).pow(2).mean((0, 2)).sqrt()[:, None]

    clt.set_normalization(resid.mean(0), scale(resid), mlp.mean(0), scale(mlp))
    return clt


def hooked_logits(model: LoadedModel, clt, ids: torch.Tensor, *, zero: bool = False) -> torch.Tensor:
    """The replacement model built from plain PyTorch hooks: each covered MLP's output (BOS excepted) becomes
    the CLT's reconstruction from the current run's ``resid_mid`` (or zero). Autograd follows it where it is on."""
    layers = range(clt.config.layer_offset, clt.config.layer_offset + clt.n_layers)
    features = []
    resid, handles = {}, []

    def save_input(module, args, i):
        resid[i] = args[0]

    def replace_output(module, args, output, i):
        if zero:
            new = torch.zeros_like(output)
        else:
            features.append(clt.encode_layer(resid[i], i))
            new = clt.decode_layer(torch.stack(features, -2), i)
        new[:, 0] = output[:, 0]
        return new

    for i, layer in enumerate(layers):
        handles.append(
            model.pre_mlp_norm(layer).register_forward_pre_hook(lambda m, a, i=i: save_input(m, a, i))
        )
        handles.append(
            model.mlp(layer).register_forward_hook(lambda m, a, o, i=i: replace_output(m, a, o, i))
        )
    try:
        return model.model(ids).logits.float()
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def model(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_error_terms_reproduce_the_original_logits(model, cross_layer):
    clt = clt_for(model, cross_layer=cross_layer)
    rm = ReplacementModel(model, clt)
    ids = random_ids(model, 2, 12)
    errors = rm.reconstruction_errors(ids)
    assert errors.shape == (2, 12, model.n_layers, model.d_model)
    original = rm.logits(ids, mode="original")
    assert original.shape == (2, 12, len(model.tokenizer))
    assert torch.allclose(original, model.model(ids).logits)
    assert torch.allclose(rm.logits(ids, errors=errors), original, atol=ATOL)
    # Without the error terms the CLT's imperfection shows; zero-ablation differs too.
    replaced = rm.logits(ids)
    ablated = rm.logits(ids, mode="zero_ablation")
    assert (replaced - original)[:, 1:].abs().max() > 100 * ATOL
    assert (ablated - original)[:, 1:].abs().max() > 100 * ATOL
    assert (ablated - replaced)[:, 1:].abs().max() > 100 * ATOL
    # BOS keeps its MLP outputs and sees only itself, so position 0 is untouched in every variant.
    assert torch.allclose(replaced[:, 0], original[:, 0], atol=ATOL)
    assert torch.allclose(ablated[:, 0], original[:, 0], atol=ATOL)


def test_reconstruction_errors_are_mlp_out_minus_clt(model):
    clt = clt_for(model)
    ids = random_ids(model, 2, 10, seed=3)
    resid, mlp = hooked_sites(model, ids, range(model.n_layers))
    expected = mlp - clt(resid.flatten(0, 1)).reconstruction.view(2, 10, model.n_layers, -1)
    errors = ReplacementModel(model, clt).reconstruction_errors(ids)
    assert torch.allclose(errors, expected, atol=1e-5)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_replacement_and_ablation_equal_a_plain_hook_implementation(model, cross_layer):
    clt = clt_for(model, cross_layer=cross_layer, seed=1)
    rm = ReplacementModel(model, clt)
    ids = random_ids(model, 2, 12, seed=4)
    assert torch.allclose(rm.logits(ids), hooked_logits(model, clt, ids), atol=ATOL)
    assert torch.allclose(
        rm.logits(ids, mode="zero_ablation"), hooked_logits(model, clt, ids, zero=True), atol=ATOL
    )


def test_logits_run_the_replaced_mlps_on_bos_alone(model):
    """The replacement and zero-ablated logits skip the covered MLPs (their outputs are overwritten); only a
    position-0 run computes the BOS outputs they keep. ``run`` records what the MLPs compute, so it runs them."""
    clt = clt_for(model, seed=5)
    rm = ReplacementModel(model, clt)
    ids = random_ids(model, 2, 12, seed=6)
    shapes = []  # of the input of each MLP's first projection (a skipped MLP's own hook still fires)
    handles = [
        next(model.mlp(layer).children()).register_forward_hook(
            lambda m, a, o: shapes.append(tuple(a[0].shape[:2]))
        )
        for layer in range(model.n_layers)
    ]
    try:
        for mode in ("replacement", "zero_ablation"):
            shapes.clear()
            rm.logits(ids, mode=mode)
            assert shapes == [(2, 1)] * model.n_layers
        shapes.clear()
        rm.run(ids)
        assert shapes == [(2, 12)] * model.n_layers
    finally:
        for handle in handles:
            handle.remove()


def test_trace_takes_the_bos_outputs_from_an_original_run(model):
    """Fine-tuning has an original run of the same ids: given its position-0 MLP outputs, ``trace`` runs no MLP at
    all and gives the same logits as the plain-hook replacement model."""
    clt = clt_for(model, seed=7)
    rm = ReplacementModel(model, clt)
    ids = random_ids(model, 2, 12, seed=8)
    original = trace_sites(model, ids, 0, model.n_layers)
    shapes = []
    handles = [
        next(model.mlp(layer).children()).register_forward_hook(
            lambda m, a, o: shapes.append(tuple(a[0].shape[:2]))
        )
        for layer in range(model.n_layers)
    ]
    try:
        with torch.no_grad():
            run = rm.trace(ids, bos=original.mlp_out[:, :1])
    finally:
        for handle in handles:
            handle.remove()
    assert shapes == []
    assert torch.allclose(run.logits, hooked_logits(model, clt, ids), atol=ATOL)
    with pytest.raises(ValueError, match=r"bos must be the MLP outputs at position 0, \(batch, 1, n_layers"):
        rm.trace(ids, bos=original.mlp_out)


def test_clt_covering_a_layer_sub_range(tiny_gpt2):
    clt = clt_for(tiny_gpt2, layer_offset=1, n_layers=2, seed=2)
    rm = ReplacementModel(tiny_gpt2, clt)
    assert rm.layers == range(1, 3)
    ids = random_ids(tiny_gpt2, 2, 12, seed=5)
    errors = rm.reconstruction_errors(ids)
    assert errors.shape == (2, 12, 2, 64)
    original = rm.logits(ids, mode="original")
    assert torch.allclose(rm.logits(ids, errors=errors), original, atol=ATOL)
    assert torch.allclose(rm.logits(ids), hooked_logits(tiny_gpt2, clt, ids), atol=ATOL)
    assert (rm.logits(ids) - original).abs().max() > 100 * ATOL


def test_clt_that_does_not_fit_the_model_is_refused(tiny_gpt2):
    wide = make_clt(4, 32, 8)
    with pytest.raises(ValueError, match=r"d_model 32\) does not fit 'tiny-gpt2' \(4 layers, d_model 64\)"):
        ReplacementModel(tiny_gpt2, wide)
    deep = make_clt(5, 64, 8)
    with pytest.raises(
        ValueError, match=r"The CLT \(layers 0–4, d_model 64\) does not fit 'tiny-gpt2' \(4 layers"
    ):
        ReplacementModel(tiny_gpt2, deep)
    shifted = make_clt(2, 64, 8, layer_offset=3)
    with pytest.raises(ValueError, match=r"layers 3–4"):
        ReplacementModel(tiny_gpt2, shifted)


def test_unknown_mode_is_refused(tiny_gpt2):
    rm = ReplacementModel(tiny_gpt2, make_clt(4, 64, 8))
    with pytest.raises(
        ValueError, match="mode must be original, replacement or zero_ablation, not 'perfect'"
    ):
        rm.logits(random_ids(tiny_gpt2, 1, 4), mode="perfect")


@pytest.fixture(scope="module")
def eval_setup(tiny_gpt2):
    clt = clt_for(tiny_gpt2, seed=3)
    config = EvalConfig(n_sequences=4, batch_size=2)
    metrics = evaluate(tiny_gpt2, clt, corpus="shakespeare", seq_len=16, config=config, progress=False)
    ids = torch.cat(
        list(
            itertools.islice(
                token_sequences(
                    "shakespeare",
                    tiny_gpt2.tokenizer,
                    seq_len=16,
                    bos_token_id=tiny_gpt2.bos_token_id,
                    split="eval",
                    batch_size=2,
                ),
                2,
            )
        )
    )
    return clt, metrics, ids


def test_evaluate_shapes_and_ce_recovered(eval_setup):
    _, m, _ = eval_setup
    assert len(m.nmse) == 4 and len(m.l0) == 4
    assert m.n_tokens == 4 * (16 - 2)  # predictions from positions 1 … 14, never from BOS
    assert m.ce_recovered == pytest.approx(
        (m.ce_zero_ablation - m.ce_replacement) / (m.ce_zero_ablation - m.ce_original)
    )
    assert m.kl >= 0 and 0 <= m.top1_agreement <= 1
    assert m.mean_l0 == pytest.approx(sum(m.l0) / 4)
    d = m.to_dict()
    assert d["mean_l0"] == m.mean_l0 and d["nmse"] == m.nmse
    assert "CE recovered" in m.summary() and "NMSE per layer" in m.summary()


def test_evaluate_matches_an_independent_computation(eval_setup, tiny_gpt2):
    clt, m, ids = eval_setup
    targets = ids[:, 2:].reshape(-1)

    def ce(logits):
        return F.cross_entropy(logits[:, 1:-1].flatten(0, 1), targets).item()

    original = tiny_gpt2.model(ids).logits.float()
    replaced = hooked_logits(tiny_gpt2, clt, ids)
    ablated = hooked_logits(tiny_gpt2, clt, ids, zero=True)
    assert m.ce_original == pytest.approx(ce(original), rel=1e-5)
    assert m.ce_replacement == pytest.approx(ce(replaced), rel=1e-4)
    assert m.ce_zero_ablation == pytest.approx(ce(ablated), rel=1e-4)
    p_orig = original[:, 1:-1].log_softmax(-1)
    p_repl = replaced[:, 1:-1].log_softmax(-1)
    kl = (p_orig.exp() * (p_orig - p_repl)).sum(-1).mean().item()
    assert m.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
    top1 = (p_orig.argmax(-1) == p_repl.argmax(-1)).float().mean().item()
    assert m.top1_agreement == pytest.approx(top1)

    resid, mlp = hooked_sites(tiny_gpt2, ids, range(4))
    x, y = resid[:, 1:].flatten(0, 1), mlp[:, 1:].flatten(0, 1)  # BOS excluded
    out = clt(x)
    nmse = (out.reconstruction - y).pow(2).sum((0, 2)) / (y - y.mean(0)).pow(2).sum((0, 2))
    assert m.nmse == pytest.approx(nmse.tolist(), rel=1e-4)
    assert m.l0 == pytest.approx((out.features > 0).sum(-1).float().mean(0).tolist())


def test_evaluate_reads_exactly_n_sequences(tiny_gpt2):
    """EvalConfig.n_sequences is the number of held-out sequences, also when batch_size does not divide it."""
    clt = make_clt(4, 64, 8, seed=4)
    config = EvalConfig(n_sequences=3, batch_size=2)
    metrics = evaluate(tiny_gpt2, clt, corpus="shakespeare", seq_len=16, config=config, progress=False)
    assert metrics.n_tokens == 3 * (16 - 2)


def test_held_out_keeps_the_original_runs_and_scores_each_clt_as_evaluate_does(tiny_gpt2, monkeypatch):
    """A kept HeldOut runs the original model once (full-length runs counted), yet scores every CLT exactly as
    a fresh evaluate does; a CLT covering other layers has its references measured again."""
    import cltlab.replacement as replacement_module

    config = EvalConfig(n_sequences=3, batch_size=2)
    full_runs = []

    def counting(model, ids, *args, **kwargs):
        if ids.shape[1] == 16:
            full_runs.append(len(ids))
        return trace_sites(model, ids, *args, **kwargs)

    held_out = HeldOut(tiny_gpt2, corpus="shakespeare", seq_len=16, config=config, keep=True)
    clts = [clt_for(tiny_gpt2, seed=seed) for seed in (5, 6)] + [clt_for(tiny_gpt2, layer_offset=1, seed=7)]
    expected = [
        evaluate(tiny_gpt2, clt, corpus="shakespeare", seq_len=16, config=config, progress=False)
        for clt in clts
    ]
    monkeypatch.setattr(replacement_module, "trace_sites", counting)
    scored = [held_out.score(clt, progress=False) for clt in clts[:2]]
    # the first score ran the original model on the 3 sequences (batches of 2 and 1), the second did not
    assert full_runs == [2, 1]
    scored.append(held_out.score(clts[2], progress=False))
    assert full_runs == [2, 1, 2, 1]  # other layers: the zero-ablated run differs, so both are measured again
    assert scored[0].kl != scored[1].kl  # two different CLTs
    for got, want in zip(scored, expected, strict=True):
        assert got == want
    unkept = HeldOut(tiny_gpt2, corpus="shakespeare", seq_len=16, config=config)
    unkept.score(clts[0], progress=False)
    unkept.score(clts[1], progress=False)
    assert full_runs == [2, 1, 2, 1, 2, 1, 2, 1]


def test_held_out_does_not_keep_runs_that_would_fill_the_memory(tiny_gpt2, monkeypatch, caplog):
    import cltlab.replacement as replacement_module

    config = EvalConfig(n_sequences=3, batch_size=2)
    clt = clt_for(tiny_gpt2, seed=5)
    expected = evaluate(tiny_gpt2, clt, corpus="shakespeare", seq_len=16, config=config, progress=False)
    # A quarter of this is less than one batch's float32 log-probabilities (2 × 14 positions × 50,257 tokens).
    monkeypatch.setattr(replacement_module, "available_memory", lambda device: 4 * 10**6)
    held_out = HeldOut(tiny_gpt2, corpus="shakespeare", seq_len=16, config=config, keep=True)
    with caplog.at_level("WARNING", logger="cltlab"):
        assert held_out.score(clt, progress=False) == expected
    assert "more than a quarter of the memory available on cpu: not kept" in caplog.text
    assert held_out.keep is False and held_out._kept is None
    assert held_out.score(clt, progress=False) == expected  # measured again


@pytest.mark.parametrize("layer_offset", [0, 1])
def test_run_records_the_features_and_both_mlp_outputs(tiny_gpt2, layer_offset):
    clt = clt_for(tiny_gpt2, layer_offset=layer_offset)
    replacement = ReplacementModel(tiny_gpt2, clt)
    ids = random_ids(tiny_gpt2, 2, 7, seed=3)
    run = replacement.run(ids)
    L = clt.n_layers
    assert run.features.shape == (2, 7, L, clt.d_features) and run.mlp_out.shape == (2, 7, L, clt.d_model)
    assert torch.allclose(run.logits, replacement.logits(ids), atol=ATOL)  # the same replacement pass
    # The first covered layer sees the original residual stream: its MLP output and features are the original's.
    resid, mlp = hooked_sites(tiny_gpt2, ids, replacement.layers)
    assert torch.allclose(run.mlp_out[:, :, 0], mlp[:, :, 0], atol=ATOL)
    assert torch.allclose(run.features[:, :, 0], clt.encode_layer(resid[:, :, 0], 0), atol=ATOL)
    # What the CLT wrote at every layer is its decoding of the features the run computed.
    for layer in range(L):
        assert torch.allclose(
            run.reconstruction[:, :, layer], clt.decode_layer(run.features, layer), atol=ATOL
        )
    assert not torch.allclose(run.mlp_out[:, 1:, -1], mlp[:, 1:, -1], atol=ATOL)  # later layers drift
