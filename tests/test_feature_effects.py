"""One feature's activations on given tokens, its decoder norm per target layer and its direct logit effects."""

from __future__ import annotations

import pytest
import torch
from helpers import hooked_sites, make_clt, random_ids

from cltlab.feature_effects import decoder_norms_by_target, feature_activations, logit_effects, unembedding


@pytest.mark.parametrize("layer_offset", [0, 2])
def test_feature_activations_encode_the_original_resid_mid(tiny_gpt2, layer_offset):
    clt = make_clt(4 - layer_offset, 64, 10, layer_offset=layer_offset, threshold_init=0.05)
    ids = random_ids(tiny_gpt2, 2, 9)
    resid, _ = hooked_sites(tiny_gpt2, ids, range(layer_offset, 4))
    for layer in range(clt.n_layers):
        acts = feature_activations(tiny_gpt2, clt, ids, layer)
        assert acts.shape == (2, 9, 10)
        assert torch.allclose(acts, clt.encode_layer(resid[:, :, layer], layer), atol=1e-5)
        assert (acts > 0).any()


@pytest.mark.parametrize("cross_layer", [True, False])
def test_decoder_norms_are_per_target_layer_in_model_units(cross_layer):
    clt = make_clt(4, 8, 6, cross_layer=cross_layer)
    norms = decoder_norms_by_target(clt, 1, 5)
    if cross_layer:
        expected = [(clt.W_dec[1][5, t].norm() * clt.output_scale[1 + t, 0]).item() for t in range(3)]
    else:
        expected = [(clt.W_dec[1][5, 0].norm() * clt.output_scale[1, 0]).item()]
    assert norms.tolist() == pytest.approx(expected)


def test_logit_effects_rank_the_unembedded_decoder_direction(tiny_gpt2):
    clt = make_clt(4, 64, 6)
    W_U = unembedding(tiny_gpt2)
    assert W_U.shape == (len(tiny_gpt2.tokenizer), 64)
    effects = logit_effects(clt, W_U, 2, 3, n=5)
    direction = clt.W_dec[2][3, 0] * clt.output_scale[2, 0] + clt.W_dec[2][3, 1] * clt.output_scale[3, 0]
    logits = W_U @ direction
    assert [t for t, _ in effects.promoted] == logits.topk(5).indices.tolist()
    assert [t for t, _ in effects.suppressed] == (-logits).topk(5).indices.tolist()
    values = [v for _, v in effects.promoted] + [v for _, v in effects.suppressed]
    assert values[:5] == sorted(values[:5], reverse=True) and values[5:] == sorted(values[5:])
    assert values[0] == pytest.approx(logits.max().item(), rel=1e-5) and values[5] == pytest.approx(
        logits.min().item(), rel=1e-5
    )
