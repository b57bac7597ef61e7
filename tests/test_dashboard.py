"""The static feature dashboard and circuit-tracer's feature files, checked against the statistics and the CLT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import feature_clt

from cltlab import DiscBuffer, export_dashboard, feature_statistics
from cltlab.attribution.export import cantor
from cltlab.dashboard import decoder_neighbours, logit_histograms
from cltlab.feature_effects import feature_directions, unembedding
from cltlab.interop import export_feature_files

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)""", re.IGNORECASE)
"""An attribute that points anywhere but a relative path (http:, https:, file:, //cdn ...)."""


@pytest.fixture(scope="module")
def clt(buffer_path):
    return feature_clt(DiscBuffer(buffer_path, batch_size=100).stats)  # three features of layer 2 never fire


@pytest.fixture(scope="module")
def stats(clt, buffer_path, tiny_gpt2):
    return feature_statistics(
        clt, DiscBuffer(buffer_path, batch_size=100), k=4, model=tiny_gpt2, progress=False
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory, stats, clt, tiny_gpt2) -> Path:
    out = tmp_path_factory.mktemp("dashboard")
    assert export_dashboard(stats, clt, tiny_gpt2, out, progress=False) == out / "index.html"
    return out


def test_the_site_has_an_index_a_page_per_layer_and_per_feature_and_needs_no_network(site):
    import plotly

    assert sorted(p.name for p in site.glob("layer_*.html")) == [f"layer_{i}.html" for i in range(4)]
    pages = sorted(site.glob("features/L*/*.html"))
    assert len(pages) == 4 * 12
    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert (site / "plotly.min.js").read_bytes() == bundled.read_bytes()  # from the installed package
    for page in [site / "index.html", *site.glob("layer_*.html"), *pages]:
        text = page.read_text()
        assert not EXTERNAL.search(text), f"{page} points outside the site: {EXTERNAL.search(text)[0]}"
        for target in re.findall(r'(?:src|href)="([^"]+)"', text):  # every relative link resolves
            assert (page.parent / target).exists(), f"{page}: {target} is missing"


def test_a_layer_page_lists_every_feature_by_frequency_with_its_figures(site, stats):
    text = (site / "layer_1.html").read_text()
    shown = [int(f) for f in re.findall(r'<tr><td data-value="(\d+)">', text)]
    assert shown == stats.order(1, "frequency")
    frequency = [float(v) for v in re.findall(r'<td data-value="([0-9.e-]+)">[0-9.]+%</td>', text)]
    assert frequency == pytest.approx(stats.frequency[1, shown].tolist())
    assert "sortBy(this, 1)" in text and "sortBy(this, 3)" in text  # frequency and label sort


def test_a_feature_page_shows_the_statistics_contexts_and_logit_effects(site, stats, tiny_gpt2):
    text = (site / "features" / "L1" / "7.html").read_text()
    assert f"density {stats.frequency[1, 7].item():.3%}" in text
    focus = [float(v) for v in re.findall(r'<i class="f" style="--a:[0-9.]+" title="([^"]+)"', text)]
    bands = [v for band in reversed(range(4)) for v in stats.band_values[1, 7, band].tolist() if v > 0]
    assert focus == pytest.approx(stats.top_values[1, 7].tolist() + bands, rel=1e-3)  # top, then each band
    assert text.count("sampled from (") == sum(int((stats.band_rows[1, 7, b] >= 0).any()) for b in range(4))
    correlated = re.findall(r'class="correlated" href="\.\./L1/(\d+)\.html"', text)
    assert [int(f) for f in correlated] == stats.correlated[1, 7].tolist()
    assert text.count("Plotly.newPlot(") == 3
    promoted = tiny_gpt2.tokenizer.decode([int(stats.top_logit_ids[1, 7, 0])]).replace("\n", "⏎")
    assert f"<code>{promoted}</code>" in text or promoted in text
    dead = (site / "features" / "L2" / "0.html").read_text()
    assert "never fired" in dead and '<i class="f"' not in dead


def test_neighbours_are_the_nearest_decoder_directions_by_brute_force(clt, site):
    near = decoder_neighbours(clt, n=5)
    for target in range(4):
        vectors = {(s, f): clt.W_dec[s][f, target - s] for s in range(target + 1) for f in range(12)}
        for feature in range(12):
            mine = vectors[(target, feature)]
            scores = {
                key: torch.nn.functional.cosine_similarity(mine, v, dim=0).item()
                for key, v in vectors.items()
                if key != (target, feature)
            }
            best = sorted(scores, key=scores.get, reverse=True)[:5]
            got = list(
                zip(
                    near.layers[target, feature].tolist(),
                    near.features[target, feature].tolist(),
                    strict=True,
                )
            )
            assert got == best
            assert near.cosine[target, feature].tolist() == pytest.approx([scores[k] for k in best], abs=1e-5)
    page = (site / "features" / "L3" / "4.html").read_text()
    links = re.findall(r'class="neighbour" href="\.\./L(\d+)/(\d+)\.html"', page)
    assert [(int(a), int(b)) for a, b in links[:5]] == list(
        zip(near.layers[3, 4].tolist(), near.features[3, 4].tolist(), strict=True)
    )


def test_logit_histograms_count_every_token_of_the_vocabulary(clt, tiny_gpt2):
    U = unembedding(tiny_gpt2)
    hist = logit_histograms(clt, U, bins=10)
    logits = feature_directions(clt, 2, 5) @ U.float().T
    edges, counts = hist[2, 5]
    assert counts[:10].sum() == logits.numel() and edges[0] == pytest.approx(logits.min().item())
    expected = torch.histogram(logits, bins=10, range=(logits.min().item(), logits.max().item())).hist
    assert counts[:10].tolist() == pytest.approx(expected.tolist(), abs=1)  # edge ties may fall either side


def test_pages_need_statistics_with_their_windows(stats, clt, tiny_gpt2, tmp_path):
    import dataclasses

    bare = dataclasses.replace(stats, context_ids=None, context_acts=None)
    with pytest.raises(ValueError, match="keep no context windows"):
        export_dashboard(bare, clt, tiny_gpt2, tmp_path, progress=False)


def test_circuit_tracers_feature_files_follow_its_schema(stats, clt, tiny_gpt2, tmp_path):
    folder = export_feature_files(stats, clt, tiny_gpt2, tmp_path, scan="my-scan", features={1: [7], 2: [0]})
    assert folder == tmp_path / "features" / "my-scan"
    record = json.loads((folder / f"{cantor(1, 7)}.json").read_text())
    assert set(record) == {
        "transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max",
        "quantile_values", "histogram", "activation_frequency",
    }  # fmt: skip
    assert record["index"] == cantor(1, 7) and record["transcoder_id"] == "my-scan"
    assert record["act_max"] == pytest.approx(stats.max_activation[1, 7].item())
    assert record["activation_frequency"] == pytest.approx(stats.frequency[1, 7].item())
    assert sum(record["histogram"]) == round(stats.frequency[1, 7].item() * stats.n_tokens)
    assert len(record["quantile_values"]) == 3 and record["quantile_values"] == sorted(
        record["quantile_values"]
    )
    examples = record["examples_quantiles"][0]["examples"]
    assert len(examples) == 4
    names = [q["quantile_name"] for q in record["examples_quantiles"]]
    assert (
        names[0] == "Top activations" and len(names) == 5 and names[1].startswith("Interval 1: (0.75, 1.00]")
    )
    sampled = [e for q in record["examples_quantiles"][1:] for e in q["examples"]]
    assert len(sampled) == int((stats.band_rows[1, 7] >= 0).sum())
    for example, top in zip(examples, stats.top_values[1, 7].tolist(), strict=True):
        assert set(example) == {"tokens", "tokens_acts_list", "train_token_ind", "is_repeated_datapoint"}
        assert len(example["tokens"]) == len(example["tokens_acts_list"])
        assert example["tokens_acts_list"][example["train_token_ind"]] == pytest.approx(top, rel=1e-5)
    assert len(record["top_logits"]) == len(record["bottom_logits"]) == 10
    dead = json.loads((folder / f"{cantor(2, 0)}.json").read_text())
    assert dead["examples_quantiles"][0]["examples"] == [] and dead["activation_frequency"] == 0
