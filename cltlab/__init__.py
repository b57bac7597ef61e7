"""cltlab: cross-layer transcoders, from harvest to replacement model, driven from notebooks.

Importing cltlab starts nothing (no threads, no network); the nouns below are the public API.
"""

__version__ = "0.1.0"

from . import plots  # noqa: E402
from .attribution import AttributionGraph, Intervention, attribute, intervene  # noqa: E402
from .buffer import DiscBuffer  # noqa: E402
from .clt import CrossLayerTranscoder  # noqa: E402
from .config import CLTConfig, EvalConfig, HarvestConfig, Profile, TrainConfig, get_profile  # noqa: E402
from .features import FeatureStatistics, feature_statistics, feature_stats, top_contexts  # noqa: E402
from .harvest import harvest  # noqa: E402
from .interop import export_circuit_tracer, import_circuit_tracer  # noqa: E402
from .jumprelu import JumpReLU  # noqa: E402
from .models import load_model  # noqa: E402
from .replacement import ReplacementModel, evaluate  # noqa: E402
from .run import RunPaths, notebook, run_paths  # noqa: E402
from .train import train  # noqa: E402

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
