"""cltlab: cross-layer transcoders, from harvest to replacement model, driven from notebooks."""

__version__ = "0.1.0"

from .buffer import DiscBuffer  # noqa: E402
from .clt import CrossLayerTranscoder  # noqa: E402
from .config import CLTConfig, EvalConfig, HarvestConfig, Profile, TrainConfig, get_profile  # noqa: E402
from .harvest import harvest  # noqa: E402
from .interop import export_circuit_tracer, import_circuit_tracer  # noqa: E402
from .jumprelu import JumpReLU  # noqa: E402
from .models import load_model  # noqa: E402
from .replacement import ReplacementModel, evaluate  # noqa: E402
from .train import train  # noqa: E402

__all__ = [
    "CLTConfig",
    "CrossLayerTranscoder",
    "DiscBuffer",
    "EvalConfig",
    "HarvestConfig",
    "JumpReLU",
    "Profile",
    "ReplacementModel",
    "TrainConfig",
    "evaluate",
    "export_circuit_tracer",
    "get_profile",
    "harvest",
    "import_circuit_tracer",
    "load_model",
    "train",
]

