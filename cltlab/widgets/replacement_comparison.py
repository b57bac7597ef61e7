"""ReplacementComparison: one prompt through the original and the replacement model, side by side."""

from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from ..html import code, table, token_text
from ..replacement import ReplacementModel
from .feature_browser import FeatureBrowser
from .snapshot import StaticCopy


class ReplacementComparison(StaticCopy, widgets.VBox):
    """Type a prompt; compare what the original and the replacement model predict after each token.

    Shows, at the chosen token position (the last by default): both models' top-k next tokens with their
    probabilities side by side and the KL divergence between them; for the whole prompt, the per-layer
    reconstruction error of the CLT; and the features active at that position, strongest first, each a button
    that opens the feature in ``browser``.

    Attributes (the child widgets):
        prompt: the text box (press Enter, or ``run``); BOS is prepended to its tokens.
        position: one toggle button per token; picking one shows that position.
        summary: HTML line with the KL at the position and averaged over the prompt.
        top_tokens: HTML table, original vs replacement top-k next tokens.
        figure: ``go.FigureWidget`` of the per-layer error ‖mlp_out − CLT‖² ÷ ‖mlp_out‖² (mean over positions,
            and at the position), measured in the replacement run.
        features: a box of buttons (or an HTML list without a browser), one per active feature.
        browser: the ``FeatureBrowser`` the feature buttons open (shown below), or None.
    """

    def __init__(
        self,
        replacement: ReplacementModel,
        browser: FeatureBrowser | None = None,
        *,
        prompt: str = "The quick brown fox jumps over the lazy dog",
        k: int = 8,
        n_features: int = 16,
    ):
        self.replacement, self.browser, self.k, self.n_features = replacement, browser, k, n_features
        self.prompt = widgets.Text(
            prompt, description="prompt", continuous_update=False, layout=widgets.Layout(width="70%")
        )
        self.position = widgets.ToggleButtons(description="position", style={"button_width": "auto"})
        self.summary = widgets.HTML()
        self.top_tokens = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.figure = _figure()
        self.features = widgets.VBox()
        children = [
            self.prompt,
            self.position,
            self.summary,
            widgets.HBox([self.top_tokens, self.figure]),
            widgets.HTML("<b>Features active at this position</b> (click one to open it in the browser)"),
            self.features,
        ]
        super().__init__(children + ([browser] if browser is not None else []))
        self.add_class("cltlab-replacement-comparison")
        self.prompt.observe(lambda change: self.run(), "value")
        self.position.observe(lambda change: self._show(change.new), "value")
        self.run()

    @torch.no_grad()
    def run(self) -> None:
        """Run both models on the prompt and show its last position."""
        model = self.replacement.model
        ids = [model.bos_token_id] + model.tokenizer.encode(self.prompt.value, add_special_tokens=False)
        batch = torch.tensor([ids])
        original = self.replacement.logits(batch, mode="original")[0].cpu()  # (seq, vocab)
        run = self.replacement.run(batch)
        self._ids = ids
        self._p_original = F.softmax(original, -1)
        self._p_replacement = F.softmax(run.logits[0].cpu(), -1)
        log_o, log_r = F.log_softmax(original, -1), F.log_softmax(run.logits[0].cpu(), -1)
        self._kl = (log_o.exp() * (log_o - log_r)).sum(-1)  # (seq,) KL(original ‖ replacement)
        mlp_out, recon = run.mlp_out[0].cpu(), run.reconstruction[0].cpu()  # (seq, n_layers, d_model)
        self._error = (mlp_out - recon).pow(2).sum(-1) / mlp_out.pow(2).sum(-1).clamp_min(1e-12)
        self._features = run.features[0].cpu()  # (seq, n_layers, d_features)
        labels = [(f"{i}:{token_text(model.tokenizer, t)}", i) for i, t in enumerate(ids) if i > 0]
        self.position.unobserve_all("value")
        self.position.options = labels
        self.position.value = labels[-1][1] if labels else None
        self.position.observe(lambda change: self._show(change.new), "value")
        self._show(self.position.value)

    def _show(self, position: int | None) -> None:
        if position is None:
            self.summary.value = "<i>Type a prompt: positions after BOS are compared.</i>"
            self.top_tokens.value, self.features.children = "", []
            return
        tok, k = self.replacement.model.tokenizer, self.k
        mean_kl = self._kl[1:].mean().item()
        self.summary.value = (
            f"after <b>{code(token_text(tok, self._ids[position]))}</b> (position {position}): "
            f"KL(original ‖ replacement) = <b>{self._kl[position]:.4f}</b> nats · mean over the prompt "
            f"{mean_kl:.4f} nats"
        )
        o, r = self._p_original[position].topk(k), self._p_replacement[position].topk(k)
        rows = [
            (code(token_text(tok, oi)), f"{op:.3g}", code(token_text(tok, ri)), f"{rp:.3g}")
            for oi, op, ri, rp in zip(o.indices, o.values, r.indices, r.values, strict=True)
        ]
        self.top_tokens.value = table(
            ["original", "p", "replacement", "p"], rows, css_class="cltlab-top-tokens"
        )
        layers = [self.replacement.layers.start + i for i in range(self._error.shape[1])]
        with self.figure.batch_update():
            self.figure.data[0].x, self.figure.data[0].y = layers, self._error[1:].mean(0).tolist()
            self.figure.data[1].x, self.figure.data[1].y = layers, self._error[position].tolist()
        self.features.children = self._feature_links(position)

    def _feature_links(self, position: int) -> list[widgets.Widget]:
        acts = self._features[position]  # (n_layers, d_features)
        active = acts.nonzero()
        values = acts[active[:, 0], active[:, 1]]
        order = values.argsort(descending=True)[: self.n_features]
        offset = self.replacement.layers.start
        links = []
        for layer, feature, value in zip(
            active[order, 0].tolist(), active[order, 1].tolist(), values[order].tolist(), strict=True
        ):
            label = f"L{layer + offset} #{feature} · {value:.2f}"
            if self.browser is None:
                links.append(widgets.HTML(f"<code>{label}</code>"))
                continue
            button = widgets.Button(description=label, layout=widgets.Layout(width="auto"))
            button.add_class("cltlab-feature-link")
            button.on_click(lambda _, layer=layer, feature=feature: self.browser.show(layer, feature))
            links.append(button)
        if not links:
            return [widgets.HTML("<i>No feature is active here.</i>")]
        return [widgets.HBox(links, layout=widgets.Layout(flex_flow="row wrap"))]


def _figure() -> go.FigureWidget:
    fig = go.Figure()
    fig.add_trace(go.Bar(name="mean over the prompt", marker_color="#aaaaaa"))
    fig.add_trace(go.Scatter(name="at the position", mode="lines+markers", line_color="#d62728"))
    fig.update_layout(
        title="reconstruction error per layer: ‖mlp_out − CLT‖² / ‖mlp_out‖²",
        xaxis_title="layer",
        xaxis_dtick=1,
        height=300,
        margin=dict(t=50, b=40, l=50, r=20),
        legend=dict(orientation="h", y=-0.25),
    )
    return go.FigureWidget(fig, layout=dict(width=460))
