"""cltlab: cross-layer transcoders, from harvest to replacement model, driven from notebooks.

Importing cltlab starts nothing (no threads, no network); the nouns below are the public API.
"""

import importlib.metadata

from . import plots
from .attribution import AttributionGraph, Intervention, attribute, intervene
from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder
from .config import CLTConfig, EvalConfig, HarvestConfig, Profile, TrainConfig, get_profile
from .features import FeatureStatistics, feature_statistics, feature_stats, top_contexts
from .harvest import harvest
from .interop import export_circuit_tracer, import_circuit_tracer
from .jumprelu import JumpReLU
from .models import load_model
from .replacement import ReplacementModel, evaluate
from .run import RunPaths, notebook, run_paths
from .train import train

__version__ = importlib.metadata.version("cltlab")  # one version, pyproject.toml's

__all__ = [
    "ActivationClient",
    "AttributionGraph",
    "AttributionGraphView",
    "CLTConfig",
    "CrossLayerTranscoder",
    "DiscBuffer",
    "EvalConfig",
    "FeatureBrowser",
    "FeatureStatistics",
    "HarvestConfig",
    "Intervention",
    "JumpReLU",
    "Profile",
    "ReplacementComparison",
    "ReplacementModel",
    "RunPaths",
    "TrainConfig",
    "attribute",
    "evaluate",
    "export_circuit_tracer",
    "feature_statistics",
    "feature_stats",
    "get_profile",
    "harvest",
    "import_circuit_tracer",
    "intervene",
    "load_model",
    "notebook",
    "plots",
    "run_paths",
    "serve",
    "top_contexts",
    "train",
]


def __getattr__(name: str):
    # The widgets import ipywidgets, which registers itself with a running kernel, and the server imports FastAPI
    # and uvicorn: load them on first use only, so that importing cltlab stays light and free of side effects.
    if name in ("AttributionGraphView", "FeatureBrowser", "ReplacementComparison"):
        from . import widgets

        return getattr(widgets, name)
    if name in ("ActivationClient", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'cltlab' has no attribute {name!r}")
