"""A widget's static copy: plain HTML of what it shows now, shown wherever no widget state is kept (the HTML
report of ``cltlab run``, a saved notebook opened without its kernel). Plotly figures stay plotly, drawn by the
page's own plotly.js (the report embeds it with the notebooks' first figure)."""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go


def snapshot(widget: widgets.Widget) -> str:
    """The widget tree as HTML: figures, HTML panes, boxes (an HBox side by side), controls as their values."""
    if isinstance(widget, go.FigureWidget):
        return go.Figure(widget).to_html(include_plotlyjs=False, full_html=False)
    if isinstance(widget, widgets.HTML):
        return widget.value
    if isinstance(widget, widgets.Box):
        inner = "".join(snapshot(child) for child in widget.children)
        row = "display:flex;gap:20px;align-items:flex-start" if isinstance(widget, widgets.HBox) else ""
        return f'<div style="{row}">{inner}</div>'
    if isinstance(widget, widgets.Button):
        return f"<button disabled>{html.escape(widget.description)}</button>"
    if isinstance(widget, widgets.ValueWidget):
        shown = widget.label if hasattr(widget, "label") and widget.label is not None else widget.value
        return f"<span style='margin-right:12px'>{html.escape(widget.description)}: {html.escape(str(shown))}</span>"
    return ""


class StaticCopy:
    """Mixed into a widget: its display carries, beside the live view, ``text/html`` with its ``snapshot``."""

    def _repr_mimebundle_(self, **kwargs):
        data = super()._repr_mimebundle_(**kwargs)
        data["text/html"] = f'<div class="cltlab-snapshot">{snapshot(self)}</div>'
        return data
