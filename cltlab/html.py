"""Small HTML fragments the widgets show: tokens shaded by an activation, and plain tables."""

from __future__ import annotations

import html
from collections.abc import Sequence

SHADE = "255, 127, 14"
"""RGB of the shading (plotly's orange); its opacity is the activation over the row's maximum."""


def token_text(tokenizer, token_id: int) -> str:
    """One token as readable text: newlines shown as ⏎, other whitespace kept."""
    return readable(tokenizer.decode([int(token_id)]))


def readable(text: str) -> str:
    """A decoded token with its newlines shown as ⏎."""
    return text.replace("\n", "⏎")


def shaded_tokens(
    texts: Sequence[str], values: Sequence[float], vmax: float, *, focus: int | None = None
) -> str:
    """Tokens as ``<span class="cltlab-token">``, each shaded by its value ÷ ``vmax``; the one at ``focus``
    (the top-activating token) is outlined. Hovering a token shows its value."""
    spans = []
    for i, (text, value) in enumerate(zip(texts, values, strict=True)):
        value = float(value) + 0.0  # no "-0.000" from a JumpReLU's signed zero
        alpha = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
        classes = "cltlab-token cltlab-focus" if i == focus else "cltlab-token"
        outline = "outline:1px solid #333;" if i == focus else ""
        spans.append(
            f'<span class="{classes}" title="{value:.3f}" data-activation="{value:.4g}" '
            f'style="background-color:rgba({SHADE},{alpha:.2f});{outline}">{html.escape(text)}</span>'
        )
    return f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7">{"".join(spans)}</div>'


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, css_class: str = "") -> str:
    """A small HTML table; cells are escaped unless they are already ``Markup``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    cell = '<td style="white-space:nowrap;padding:0 8px">'
    body = "".join(
        "<tr>"
        + "".join(f"{cell}{c if isinstance(c, Markup) else html.escape(str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """A string of HTML that ``table`` puts in a cell as is."""


def code(text: str) -> Markup:
    """``text`` in a monospace span that keeps its whitespace (for tokens)."""
    return Markup(f'<code style="white-space:pre">{html.escape(text)}</code>')
