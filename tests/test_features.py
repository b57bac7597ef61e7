"""Feature statistics and top contexts, checked against a brute-force pass over the whole buffer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import feature_clt, make_clt
from safetensors.torch import save_file

from cltlab import DiscBuffer, feature_statistics, top_contexts
from cltlab.features import FeatureStatistics, layer_statistics

K = 4


@pytest.fixture(scope="module")
def buffer(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=100)
    yield buffer
    buffer.close()


@pytest.fixture(scope="module")
def clt(buffer):
    return feature_clt(buffer.stats)  # three features of layer 2 never fire


def brute_force(clt, buffer, layer: int, n: int) -> torch.Tensor:
    x = buffer.read(0, n).resid_mid[:, layer].float()
    return clt.encode_layer(x, layer)  # (n, d_features)


@pytest.mark.parametrize("block_size", [64, 4096])
def test_layer_statistics_match_brute_force(clt, buffer, block_size):
    stats = layer_statistics(clt, buffer, 2, k=K, block_size=block_size, progress=False)
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
    stats = layer_statistics(clt, buffer, 2, k=K, progress=False)
    top = stats.top_features(12)
    assert set(top[:9]) == set(range(3, 12))
    assert top[:9] == stats.frequency.argsort(descending=True)[:9].tolist()
    by_peak = stats.top_features(2, by="max_activation")
    assert by_peak == stats.max_activation.argsort(descending=True)[:2].tolist()


def test_max_tokens_limits_the_pass(clt, buffer):
    stats = layer_statistics(clt, buffer, 0, k=K, block_size=64, max_tokens=150, progress=False)
    f = brute_force(clt, buffer, 0, 150)
    assert stats.n_tokens == 150
    assert torch.allclose(stats.frequency, (f > 0).float().mean(0))
    assert (stats.top_rows < 150).all()


def test_layer_statistics_errors(clt, buffer):
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\), not 4"):
        layer_statistics(clt, buffer, 4, progress=False)
    with pytest.raises(
        ValueError, match="holds 4 layers of d_model 64, but the CLT has 4 layers of d_model 8"
    ):
        layer_statistics(make_clt(4, 8, 4), buffer, 0, progress=False)


def test_top_contexts_show_the_activating_token(clt, buffer, tiny_gpt2):
    stats = layer_statistics(clt, buffer, 2, k=K, progress=False)
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


# ------------------------------------------------------------------------------ all layers, saved and reloaded


class CountingBuffer:
    """A DiscBuffer stand-in that records the size of every read (to check the pass streams in blocks)."""

    def __init__(self, buffer):
        self.buffer, self.reads = buffer, []

    def __getattr__(self, name):
        return getattr(self.buffer, name)

    def input_blocks(self, *args, **kwargs):
        for start, stop, resid in self.buffer.input_blocks(*args, **kwargs):
            self.reads.append(stop - start)
            yield start, stop, resid


def test_feature_statistics_match_brute_force_on_every_layer(clt, buffer):
    counting = CountingBuffer(buffer)
    stats = feature_statistics(clt, counting, k=K, n_bins=24, block_size=64, progress=False)
    # A streaming pass in blocks, one more for the band samples, then the blocks that hold the contexts' windows.
    reads = counting.reads
    assert max(reads) <= 64 and sum(reads[:8]) == sum(reads[8:16]) == 500 and sum(reads[16:]) <= 500
    assert stats.n_layers == 4 and stats.d_features == 12 and stats.n_tokens == 500 and not stats.reused
    for layer in range(4):
        f = brute_force(clt, buffer, layer, 500)
        active = f > 0
        assert torch.allclose(stats.frequency[layer], active.float().mean(0))
        assert torch.allclose(stats.max_activation[layer], f.max(0).values, atol=1e-6)
        assert torch.allclose(stats.mean_activation[layer], f.sum(0) / active.sum(0).clamp_min(1), atol=1e-5)
        assert torch.allclose(stats.top_values[layer], f.T.topk(K, dim=1).values, atol=1e-6)
        for feature in range(12):  # the histogram counts every activation in the bin that holds it
            values = f[active[:, feature], feature]
            expected = torch.histogram(values.clamp(1e-3, 999.9), bins=stats.bin_edges).hist
            assert torch.equal(stats.histogram[layer, feature], expected.int())
    assert stats.bin_edges[0] == pytest.approx(1e-3) and stats.bin_edges[-1] == pytest.approx(1e3)
    assert stats.layer(2).histogram.shape == (12, 24)
    assert stats.is_dead(2, 0) and not stats.is_dead(2, 5)


def test_feature_statistics_memory_does_not_grow_with_tokens(clt, buffer):
    small = feature_statistics(clt, buffer, k=K, max_tokens=100, progress=False)
    large = feature_statistics(clt, buffer, k=K, progress=False)
    for name in FeatureStatistics.TENSORS:
        assert getattr(small, name).shape == getattr(large, name).shape
    assert small.n_tokens == 100 and (small.top_rows < 100).all()


def test_feature_statistics_are_saved_beside_the_clt_and_reloaded(clt, buffer, tmp_path):
    save_dir = tmp_path / "clt" / "feature_stats"
    first = feature_statistics(clt, buffer, k=K, save_dir=save_dir, progress=False)
    assert (save_dir / "stats.safetensors").exists() and (save_dir / "stats.json").exists()
    counting = CountingBuffer(buffer)
    again = feature_statistics(clt, counting, k=K, save_dir=save_dir, progress=False)
    assert again.reused and counting.reads == []  # loaded, not recomputed
    for name in FeatureStatistics.TENSORS:
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert torch.equal(first.context_ids, again.context_ids)
    torch.testing.assert_close(first.context_acts, again.context_acts, equal_nan=True, rtol=0, atol=0)
    assert FeatureStatistics.load(save_dir).n_tokens == 500
    # Other settings or another encoder: computed again (and saved over the old ones).
    assert not feature_statistics(clt, buffer, k=K + 1, save_dir=save_dir, progress=False).reused
    other = make_clt(4, 64, 12, normalization=False, threshold_init=0.5, seed=6)
    other.set_normalization(*buffer.stats)
    assert not feature_statistics(other, counting, k=K, save_dir=save_dir, progress=False).reused
    assert counting.reads[0] == 500  # computed: a pass over the buffer (then the windows' blocks)


def test_statistics_saved_by_an_older_cltlab_are_recomputed_not_misread(clt, buffer, tmp_path):
    first = feature_statistics(clt, buffer, k=K, save_dir=tmp_path, progress=False)
    meta = json.loads((tmp_path / "stats.json").read_text())
    # Version 1 had no context windows: a folder of it is recomputed (and replaced), never loaded.
    old = {name: getattr(first, name) for name in FeatureStatistics.TENSORS}
    save_file(old, str(tmp_path / "stats.safetensors"))
    (tmp_path / "stats.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match="version 1; this cltlab reads version 2"):
        FeatureStatistics.load(tmp_path)
    again = feature_statistics(clt, buffer, k=K, save_dir=tmp_path, progress=False)
    assert not again.reused and torch.equal(again.context_ids, first.context_ids)
    assert json.loads((tmp_path / "stats.json").read_text())["format_version"] == 2
    assert FeatureStatistics.load(tmp_path).context_acts.shape == first.context_acts.shape
    (tmp_path / "stats.json").write_text(json.dumps({**meta, "format": "something.else"}))
    with pytest.raises(ValueError, match="not feature statistics"):
        feature_statistics(clt, buffer, k=K, save_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="No feature statistics in"):
        FeatureStatistics.load(tmp_path / "missing")


def test_context_windows_hold_each_tokens_activation_as_a_brute_force_pass_finds_it(clt, buffer):
    stats = feature_statistics(clt, buffer, k=K, progress=False)
    tokens, sequence, position = buffer.token_info()
    sequences = buffer.sequences
    row_of = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(sequence, position, strict=True))}
    before, width = stats.before, stats.context_ids.shape[-1]
    assert stats.context_ids.shape == (4, 12, K + 4 * 4, width) and width == before + 1 + 4
    rows = torch.cat([stats.top_rows, stats.band_rows.flatten(2)], -1)  # top contexts, then band samples
    values = torch.cat([stats.top_values, stats.band_values.flatten(2)], -1)
    checked = 0
    for layer in range(4):
        f = brute_force(clt, buffer, layer, 500)  # (rows, features)
        for feature in range(12):
            for j in range(rows.shape[-1]):
                row = int(rows[layer, feature, j])
                ids, acts = stats.context_ids[layer, feature, j], stats.context_acts[layer, feature, j]
                if row < 0:
                    assert (ids == -1).all() and acts.isnan().all()
                    continue
                assert acts[before] == pytest.approx(values[layer, feature, j].item(), abs=1e-5)
                for w in range(width):
                    at = int(position[row]) - before + w
                    if not 1 <= at < sequences.shape[1]:
                        assert ids[w] == -1 and acts[w].isnan()
                        continue
                    assert ids[w] == sequences[sequence[row], at]
                    other = row_of.get((int(sequence[row]), at))
                    if other is None:  # a token the harvest did not store (the token count ran out)
                        assert acts[w].isnan()
                    else:
                        assert acts[w] == pytest.approx(f[other, feature].item(), abs=1e-5)
                        checked += 1
    assert checked > 500


def test_logit_tables_are_each_features_logit_effects(clt, buffer, tiny_gpt2):
    from cltlab.feature_effects import logit_effects, unembedding

    stats = feature_statistics(clt, buffer, k=K, model=tiny_gpt2, progress=False)
    assert feature_statistics(clt, buffer, k=K, progress=False).top_logit_ids is None  # no model, no tables
    U = unembedding(tiny_gpt2)
    for layer, feature in [(0, 0), (1, 7), (3, 11)]:
        effects = logit_effects(clt, U, layer, feature, n=10)
        assert stats.top_logit_ids[layer, feature].tolist() == [t for t, _ in effects.promoted]
        assert stats.bottom_logit_ids[layer, feature].tolist() == [t for t, _ in effects.suppressed]
        assert stats.top_logit_values[layer, feature].tolist() == pytest.approx(
            [v for _, v in effects.promoted]
        )


def test_order_sorts_live_features_first(clt, buffer):
    stats = feature_statistics(clt, buffer, k=K, progress=False)
    assert stats.order(2) == list(range(12))
    by_frequency = stats.order(2, "frequency")
    assert set(by_frequency[-3:]) == {0, 1, 2}  # the dead ones come last
    assert stats.frequency[2, by_frequency].diff().le(0).all()
    assert stats.order(2, "max_activation")[0] == stats.max_activation[2].argmax().item()
    with pytest.raises(ValueError, match="by must be one of"):
        stats.order(2, "l0")


def test_contexts_are_the_buffer_windows_of_the_top_rows(clt, buffer):
    stats = feature_statistics(clt, buffer, k=K, progress=False)
    feature = stats.order(1, "frequency")[0]
    contexts = stats.contexts(buffer, 1, feature, before=3, after=2)
    assert len(contexts) == K
    for c, value, row in zip(contexts, stats.top_values[1, feature], stats.top_rows[1, feature], strict=True):
        assert (c.activation, c.row) == (pytest.approx(value.item()), row.item())
        assert (c.ids, c.index) == tuple(buffer.context(row.item(), before=3, after=2))
    assert stats.contexts(buffer, 2, 0) == []  # a dead feature has none


def test_band_samples_and_correlations_equal_a_brute_force_pass(clt, buffer):
    from cltlab.feature_pages import BANDS, row_order

    stats = feature_statistics(clt, buffer, k=K, progress=False)
    order = row_order(500)
    per_band = stats.band_rows.shape[-1]
    filled = 0
    for layer in range(4):
        f = brute_force(clt, buffer, layer, 500)
        for feature in range(12):
            peak = stats.max_activation[layer, feature].item()
            for band in range(BANDS):
                lo, hi = peak * band / BANDS, peak * (band + 1) / BANDS
                inside = [
                    r for r in range(500) if lo < f[r, feature] <= hi * (1 + 1e-6) and f[r, feature] > 0
                ]
                expected = sorted(inside, key=lambda r: order[r].item())[:per_band]
                got = [r for r in stats.band_rows[layer, feature, band].tolist() if r >= 0]
                assert got == expected, (layer, feature, band)
                for r, value in zip(got, stats.band_values[layer, feature, band].tolist(), strict=False):
                    assert value == pytest.approx(f[r, feature].item(), abs=1e-6)
                filled += len(got)
        pearson = torch.corrcoef(f.T.double())  # (features, features)
        pearson.fill_diagonal_(-2.0)
        pearson = pearson.nan_to_num(0.0)  # a dead feature has no variance
        live = stats.frequency[layer] > 0
        for feature in live.nonzero().flatten().tolist():
            expected = pearson[feature].topk(stats.correlated.shape[-1])
            assert stats.correlation[layer, feature].tolist() == pytest.approx(
                expected.values.tolist(), abs=1e-4
            )
    assert filled > 100 and (stats.band_rows[2, :3] == -1).all()  # the dead features have no samples
