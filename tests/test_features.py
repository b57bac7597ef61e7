"""Feature statistics and top contexts, checked against a brute-force pass over the whole buffer."""

from __future__ import annotations

import pytest
import torch
from helpers import make_clt

from cltlab import DiscBuffer, feature_stats, top_contexts

K = 4


@pytest.fixture(scope="module")
def buffer(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=100)
    yield buffer
    buffer.close()


@pytest.fixture(scope="module")
def clt(buffer):
    clt = make_clt(4, 64, 12, normalization=False, threshold_init=0.5, seed=5)
    clt.set_normalization(*buffer.stats)
    with torch.no_grad():
        clt.activation.log_threshold[2, :3] = 10.0  # three features of layer 2 that never fire
    return clt


def brute_force(clt, buffer, layer: int, n: int) -> torch.Tensor:
    x = buffer.read(0, n).resid_mid[:, layer].float()
    return clt.encode_layer(x, layer)  # (n, d_features)


@pytest.mark.parametrize("block_size", [64, 4096])
def test_feature_stats_match_brute_force(clt, buffer, block_size):
    stats = feature_stats(clt, buffer, 2, k=K, block_size=block_size, progress=False)
    f = brute_force(clt, buffer, 2, 500)
    active = f > 0
    assert stats.layer == 2 and stats.n_tokens == 500
    assert torch.allclose(stats.frequency, active.float().mean(0))
    assert torch.allclose(stats.max_activation, f.max(0).values, atol=1e-6)
    mean = f.sum(0) / active.sum(0).clamp_min(1)
    assert torch.allclose(stats.mean_activation, mean, atol=1e-5)
    best = f.T.topk(K, dim=1)
    assert torch.allclose(stats.top_values, best.values, atol=1e-6)
    live = best.values > 0
    assert torch.equal(stats.top_rows[live], best.indices[live])
    assert (stats.top_rows[~live] == -1).all()
    assert stats.dead_fraction == pytest.approx(3 / 12)
    assert (stats.frequency[:3] == 0).all() and (stats.frequency[3:] > 0).all()


def test_top_features_skip_dead_ones(clt, buffer):
    stats = feature_stats(clt, buffer, 2, k=K, progress=False)
    top = stats.top_features(12)
    assert set(top[:9]) == set(range(3, 12))
    assert top[:9] == stats.frequency.argsort(descending=True)[:9].tolist()
    by_peak = stats.top_features(2, by="max_activation")
    assert by_peak == stats.max_activation.argsort(descending=True)[:2].tolist()


def test_max_tokens_limits_the_pass(clt, buffer):
    stats = feature_stats(clt, buffer, 0, k=K, block_size=64, max_tokens=150, progress=False)
    f = brute_force(clt, buffer, 0, 150)
    assert stats.n_tokens == 150
    assert torch.allclose(stats.frequency, (f > 0).float().mean(0))
    assert (stats.top_rows < 150).all()


def test_feature_stats_errors(clt, buffer):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\), not 4"):
        feature_stats(clt, buffer, 4, progress=False)
    with pytest.raises(
        ValueError, match="holds 4 layers of d_model 64, but the CLT has 4 layers of d_model 8"
    ):
        feature_stats(make_clt(4, 8, 4), buffer, 0, progress=False)


def test_top_contexts_show_the_activating_token(clt, buffer, tiny_gpt2):
    stats = feature_stats(clt, buffer, 2, k=K, progress=False)
    feature = stats.top_features(1)[0]
    contexts = top_contexts(stats, buffer, tiny_gpt2.tokenizer, [feature, 0], per_feature=3, window=4)
    assert contexts.layer == 2
    assert len(contexts.rows) == 3  # feature 0 is dead and contributes no rows
    tokens, sequence, position = buffer.token_info()
    expected = zip(stats.top_values[feature][:3].tolist(), stats.top_rows[feature][:3].tolist(), strict=True)
    for (feat, value, before, token, after), (top_value, row) in zip(contexts.rows, expected, strict=True):
        assert feat == feature and value == pytest.approx(top_value)
        ids = buffer.sequences[sequence[row]]
        pos = position[row]
        assert ids[pos] == tokens[row]
        assert token == tiny_gpt2.tokenizer.decode([int(tokens[row])]).replace("\n", "⏎")
        assert before == tiny_gpt2.tokenizer.decode(ids[max(1, pos - 4) : pos].tolist()).replace("\n", "⏎")
        assert after == tiny_gpt2.tokenizer.decode(ids[pos + 1 : pos + 3].tolist()).replace("\n", "⏎")
    html = contexts._repr_html_()
    assert html.startswith("<table>") and html.count("<mark") == 3
    assert str(contexts).count(f"L2 #{feature}") == 3
