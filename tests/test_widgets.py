"""The widgets, driven from code as a user's clicks would drive them (no browser): every control changes what is
shown, and what is shown is the data it claims to be."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import feature_clt, make_clt

from cltlab import DiscBuffer, FeatureBrowser, ReplacementComparison, ReplacementModel, feature_statistics
from cltlab.feature_effects import decoder_norms_by_target


@pytest.fixture(scope="module")
def buffer(buffer_path):
    return DiscBuffer(buffer_path, batch_size=100)


@pytest.fixture(scope="module")
def clt(buffer):
    return feature_clt(buffer.stats)  # three features of layer 2 never fire


@pytest.fixture(scope="module")
def stats(clt, buffer, tiny_gpt2):
    return feature_statistics(clt, buffer, k=4, model=tiny_gpt2, progress=False)


@pytest.fixture
def browser(stats, clt, tiny_gpt2, buffer):
    return FeatureBrowser(stats, clt, tiny_gpt2, buffer, n_contexts=3, before=4, after=2)


def activations_shown(html: str) -> list[float]:
    return [float(v) for v in re.findall(r'data-activation="([^"]+)"', html)]


def test_browser_opens_on_the_most_frequent_feature_of_the_first_layer(browser, stats):
    feature = stats.frequency[0].argmax().item()
    assert (browser.layer.value, browser.sort.value, browser.rank.value) == (0, "frequency", 0)
    assert browser.feature.value == feature
    assert f"layer 0 · feature {feature}" in browser.header.value
    assert f"density {stats.frequency[0, feature].item():.3%}" in browser.header.value
    counts = stats.histogram[0, feature]
    assert sum(browser.figure.data[0].y) == counts.sum().item() > 0  # the activation histogram
    assert list(browser.figure.data[1].x) == [0, 1, 2, 3]  # it writes to every layer from 0 on
    assert list(browser.figure.data[1].y) == pytest.approx(
        decoder_norms_by_target(browser.clt, 0, feature).tolist()
    )
    assert list(browser.figure.data[3].x) == pytest.approx([stats.frequency[0, feature].log10().item()] * 2)


def focus_values(html: str) -> list[float]:
    found = re.findall(r'cltlab-token cltlab-focus" title="[^"]+" data-activation="([^"]+)"', html)
    return [float(v) for v in found]


def test_contexts_shade_every_token_by_its_activation(browser, stats):
    feature = browser.feature.value
    html = browser.contexts.value
    assert html.count("cltlab-focus") == 3 and html.count("<tr>") == 4  # 3 contexts + the header
    # Each context's top token shows the feature's top value.
    assert focus_values(html) == pytest.approx(stats.top_values[0, feature, :3].tolist(), rel=1e-3, abs=1e-3)
    values = activations_shown(html)
    assert len(values) > 3 and max(values) <= stats.max_activation[0, feature].item() + 1e-3
    assert any(v == 0 for v in values) or min(values) < max(values)  # the shading varies along a context


def test_a_switch_runs_no_model_and_shows_what_the_model_would(browser, stats, clt, tiny_gpt2, buffer):
    import dataclasses

    forwards = []
    hook = tiny_gpt2.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        pages = []
        for layer, feature in [(0, 5), (1, 7), (3, 2), (1, 4)]:
            browser.show(layer, feature)
            pages.append((browser.contexts.value, browser.tokens.value))
        assert forwards == []  # every context, activation and logit table came from the statistics
        # Statistics without the page data: the browser recomputes through the model, and shows the same.
        bare = dataclasses.replace(stats, **dict.fromkeys(stats.PAGE_TENSORS))
        slow = FeatureBrowser(bare, clt, tiny_gpt2, buffer, n_contexts=3, before=4, after=2)
        for (layer, feature), (contexts, tokens) in zip([(0, 5), (1, 7), (3, 2), (1, 4)], pages, strict=True):
            slow.show(layer, feature)
            assert activations_shown(slow.contexts.value) == pytest.approx(
                activations_shown(contexts), rel=1e-3, abs=1e-4
            )
            assert slow.tokens.value == tokens
        assert forwards  # that one ran the model
    finally:
        hook.remove()


def test_layer_change_redraws_for_that_layer(browser, stats):
    before = list(browser.figure.data[1].y)
    browser.layer.value = 2
    feature = browser.feature.value
    assert f"layer 2 · feature {feature}" in browser.header.value
    assert list(browser.figure.data[1].x) == [2, 3] and list(browser.figure.data[1].y) != before
    assert sum(browser.figure.data[2].y) == (stats.frequency[2] > 0).sum().item()  # the layer's live features


def test_sort_rank_slider_and_number_box_stay_in_step(browser, stats):
    browser.sort.value = "max_activation"
    order = stats.order(0, "max_activation")
    assert (browser.rank.value, browser.feature.value) == (0, order[0])
    browser.rank.value = 3
    assert browser.feature.value == order[3]
    assert f"feature {order[3]}" in browser.header.value
    browser.feature.value = order[7]
    assert browser.rank.value == 7
    browser.sort.value = "index"
    assert (browser.rank.value, browser.feature.value) == (0, 0)


def test_dead_features_are_marked(browser):
    browser.show(2, 1)
    assert (browser.layer.value, browser.feature.value) == (2, 1)
    assert "cltlab-dead" in browser.header.value and "never fired on 500 tokens" in browser.header.value
    assert "never fired" in browser.contexts.value and "cltlab-token" not in browser.contexts.value
    assert list(browser.figure.data[0].y) == [] and list(browser.figure.data[3].x) == []
    assert "(dead)" in browser.figure.layout.title.text
    assert browser.rank.value >= 9  # dead features sort last by frequency


def test_promoted_and_suppressed_tokens_come_from_the_decoder(browser, tiny_gpt2):
    browser.show(1, 4)
    clt = browser.clt
    direction = (clt.W_dec[1][4] * clt.output_scale[1:, 0, None]).sum(0)
    logits = tiny_gpt2.model.get_output_embeddings().weight @ direction
    top = tiny_gpt2.tokenizer.decode([logits.argmax().item()])
    bottom = tiny_gpt2.tokenizer.decode([logits.argmin().item()])
    rows = re.findall(r"<tr>(.*?)</tr>", browser.tokens.value)[1:]  # after the header
    assert len(rows) == browser.n_tokens
    first = re.findall(r"<code[^>]*>(.*?)</code>", rows[0])
    assert [t.replace("&#x27;", "'").replace("&quot;", '"').replace("&amp;", "&") for t in first] == [
        top,
        bottom,
    ]


def test_browser_refuses_statistics_of_another_clt(stats, clt, tiny_gpt2, buffer):
    with pytest.raises(ValueError, match="compute them for this CLT"):
        FeatureBrowser(stats, make_clt(4, 64, 8), tiny_gpt2, buffer)
    with pytest.raises(ValueError, match="No feature 12 in layer 0"):
        FeatureBrowser(stats, clt, tiny_gpt2, buffer).show(0, 12)


@pytest.fixture
def comparison(clt, tiny_gpt2, browser):
    return ReplacementComparison(ReplacementModel(tiny_gpt2, clt), browser, prompt="It was a dark and", k=5)


def test_comparison_shows_both_models_at_the_last_position(comparison, tiny_gpt2, clt):
    ids = torch.tensor([[tiny_gpt2.bos_token_id] + tiny_gpt2.tokenizer.encode("It was a dark and")])
    replacement = ReplacementModel(tiny_gpt2, clt)
    log_o = F.log_softmax(replacement.logits(ids, mode="original")[0, -1], -1)
    log_r = F.log_softmax(replacement.logits(ids)[0, -1], -1)
    assert comparison.position.value == ids.shape[1] - 1
    assert [label for label, _ in comparison.position.options][-1].endswith(" and")
    kl = (log_o.exp() * (log_o - log_r)).sum().item()
    assert f"= <b>{kl:.4f}</b> nats" in comparison.summary.value
    rows = re.findall(r"<tr>(.*?)</tr>", comparison.top_tokens.value)[1:]
    assert len(rows) == 5
    top_o, top_r = log_o.argmax().item(), log_r.argmax().item()
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[0])
    assert tiny_gpt2.tokenizer.decode([top_o]) in cells[0] and tiny_gpt2.tokenizer.decode([top_r]) in cells[2]
    assert float(cells[1]) == pytest.approx(log_o.exp().max().item(), rel=1e-2)
    assert list(comparison.figure.data[0].x) == [0, 1, 2, 3] and len(comparison.figure.data[1].y) == 4
    assert all(v > 0 for v in comparison.figure.data[0].y)


def test_a_new_prompt_updates_everything(comparison):
    before = (comparison.summary.value, comparison.top_tokens.value, list(comparison.figure.data[0].y))
    comparison.prompt.value = "Once upon a time there lived a king who"
    assert len(comparison.position.options) == len(comparison._ids) - 1 > 5
    assert comparison.position.value == len(comparison._ids) - 1
    after = (comparison.summary.value, comparison.top_tokens.value, list(comparison.figure.data[0].y))
    assert all(a != b for a, b in zip(after, before, strict=True))


def test_picking_a_position_lists_its_active_features_strongest_first(comparison):
    comparison.position.value = 2
    assert "(position 2)" in comparison.summary.value
    buttons = comparison.features.children[0].children
    values = [float(b.description.split("· ")[1]) for b in buttons]
    assert 0 < len(buttons) <= comparison.n_features and values == sorted(values, reverse=True)
    acts = comparison._features[2]
    layer, feature = (int(x) for x in re.match(r"L(\d+) #(\d+)", buttons[0].description).groups())
    assert acts[layer, feature].item() == pytest.approx(acts.max().item(), abs=5e-3)
    assert list(comparison.figure.data[1].y) == pytest.approx(comparison._error[2].tolist())


def test_a_feature_link_opens_the_feature_in_the_browser(comparison, browser):
    comparison.position.value = 3
    button = comparison.features.children[0].children[1]
    layer, feature = (int(x) for x in re.match(r"L(\d+) #(\d+)", button.description).groups())
    button.click()
    assert (browser.layer.value, browser.feature.value) == (layer, feature)
    assert f"layer {layer} · feature {feature}" in browser.header.value
    assert comparison.children[-1] is browser  # the browser is shown under the comparison


def test_the_comparison_leaves_a_static_copy_too(comparison):
    snapshot = comparison._repr_mimebundle_()["text/html"]
    assert "cltlab-snapshot" in snapshot and snapshot.count("Plotly.newPlot") >= 1
    import ipywidgets

    found = [w for row in comparison.features.children for w in getattr(row, "children", [row])]
    buttons = [w.description for w in found if isinstance(w, ipywidgets.Button)]
    assert buttons and all(f"<button disabled>{b}</button>" in snapshot for b in buttons[:3])


def test_without_a_browser_the_features_are_plain_text(clt, tiny_gpt2):
    comparison = ReplacementComparison(ReplacementModel(tiny_gpt2, clt), prompt="Hello there")
    assert comparison.browser is None
    labels = comparison.features.children[0].children
    assert labels and all("<code>L" in w.value for w in labels)
    comparison.prompt.value = ""
    assert comparison.position.value is None and "Type a prompt" in comparison.summary.value


def test_the_browser_leaves_a_static_copy_where_no_widget_state_is_kept(browser, stats):
    import nbformat
    from nbconvert import HTMLExporter

    browser.show(1, 4)
    bundle = browser._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # the live widget, in JupyterLab
    snapshot = bundle["text/html"]
    assert "layer 1 · feature 4" in snapshot and browser.contexts.value in snapshot
    assert browser.tokens.value in snapshot and snapshot.count("Plotly.newPlot") == 1
    assert "feature: 4" in snapshot and "layer: 1" in snapshot  # the controls, as their values
    # An executed notebook without widget state (as cltlab run saves it): its HTML shows the copy.
    output = nbformat.v4.new_output("display_data", data={k: v for k, v in bundle.items()})
    cell = nbformat.v4.new_code_cell("browser", outputs=[output], execution_count=1)
    html, _ = HTMLExporter().from_notebook_node(nbformat.v4.new_notebook(cells=[cell]))
    assert "cltlab-snapshot" in html and "layer 1 · feature 4" in html
