"""Interactive views for JupyterLab (ipywidgets + plotly): the FeatureBrowser, the ReplacementComparison and the
AttributionGraphView.

Each is an ``ipywidgets.VBox``: display it, or drive its child widgets from code (the tests do; no browser needed).
"""

from .attribution_graph import AttributionGraphView
from .feature_browser import FeatureBrowser
from .replacement_comparison import ReplacementComparison

__all__ = ["AttributionGraphView", "FeatureBrowser", "ReplacementComparison"]
