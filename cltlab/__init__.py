"""cltlab: cross-layer transcoders, from harvest to replacement model, driven from notebooks.

Importing cltlab starts nothing (no threads, no network); the nouns below are the public API.
"""

import importlib.metadata
import os

# In a kernel of `cltlab run`: text progress bars, which the runner passes on to its terminal.
if os.environ.get("CLTLAB_PROGRESS") == "text":
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm = tqdm.std.tqdm  # before cltlab's modules and Lightning's progress bar import it

from . import plots  # noqa: E402
from .attribution import AttributionGraph, Intervention, attribute, intervene
from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder
from .dashboard import export_dashboard
from .feature_pages import top_contexts
from .features import feature_statistics
from .harvest import harvest, load_harvest_model
from .interop import export_circuit_tracer
from .models import load_model
from .replacement import HeldOut, ReplacementModel, evaluate
from .run import notebook

__version__ = importlib.metadata.version("cltlab")  # one version, pyproject.toml's

__all__ = [  # in data-flow order: the names the notebooks use; the rest live in their modules
    "notebook",
    "load_model",
    "load_harvest_model",
    "harvest",
    "DiscBuffer",
    "train",
    "finetune",
    "CrossLayerTranscoder",
    "feature_statistics",
    "top_contexts",
    "FeatureBrowser",
    "export_dashboard",
    "ReplacementModel",
    "evaluate",
    "HeldOut",
    "ReplacementComparison",
    "attribute",
    "AttributionGraph",
    "AttributionGraphView",
    "intervene",
    "Intervention",
    "export_circuit_tracer",
    "serve",
    "ActivationClient",
    "plots",
]


def __getattr__(name: str):
    # The widgets import ipywidgets, which registers itself with a running kernel, the server FastAPI and uvicorn,
    # and training Lightning (~6 s on a small CPU, with torch._dynamo): load them on first use only, so that
    # importing cltlab stays light and free of side effects, and notebooks that do not train start quickly.
    if name == "train":
        from .training import train

        return train
    if name == "finetune":
        from .end_to_end import finetune

        return finetune
    if name in ("AttributionGraphView", "FeatureBrowser", "ReplacementComparison"):
        from . import widgets

        return getattr(widgets, name)
    if name in ("ActivationClient", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'cltlab' has no attribute {name!r}")
