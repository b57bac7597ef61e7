"""The activation server: batches of harvested (disc mode) or freshly computed (live mode) activations over HTTP,
and through shared memory for clients on the same host.

- ``protocol.py``: the wire format, the typed replies, and the ``Source`` protocol;
- ``sources.py``: what is served, and exactly which rows each batch holds;
- ``shm.py``: the shared-memory ring of batch slots, leased by id;
- ``state.py``: what the routes share: budgets in bytes, the rings, counters and errors;
- ``app.py``: the FastAPI app (routes, validation, Host and token checks);
- ``wire.py``: a stream's body written straight to the connection's socket;
- ``runner.py``: ``serve`` runs it in a daemon thread and returns a handle with ``url`` and ``stop()``;
- ``client.py``: ``ActivationClient`` and the ``ActivationDataset`` for DataLoaders and ``cltlab.train``;
- ``leases.py``: the client's side of shared-memory leases (renewed while held, released when collected).
"""

from .client import ActivationClient, ActivationDataset
from .protocol import Limits, Source
from .sources import DiscSource, LiveSource

__all__ = [
    "ActivationClient",
    "ActivationDataset",
    "DiscSource",
    "Limits",
    "LiveSource",
    "Source",
    "ServerHandle",
    "serve",
]


def __getattr__(name: str):
    # The app (FastAPI, uvicorn) loads only when a server starts: a client, e.g. in a DataLoader worker, needs
    # neither.
    if name in ("ServerHandle", "serve"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'cltlab.server' has no attribute {name!r}")
