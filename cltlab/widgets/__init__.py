"""Interactive views for JupyterLab (ipywidgets + plotly): the FeatureBrowser and the ReplacementComparison.

Each is an ``ipywidgets.VBox``: display it, or drive its child widgets from code (the tests do; no browser needed).
"""

from .feature_browser import FeatureBrowser
from .replacement_comparison import ReplacementComparison

__all__ = ["FeatureBrowser", "ReplacementComparison"]
