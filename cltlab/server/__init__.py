"""The activation server: batches of harvested (disc mode) or freshly computed (live mode) activations over HTTP,
and through shared memory for clients on the same host.

- ``sources.py``: what is served, and exactly which rows each batch holds;
- ``shm.py``: the shared-memory ring of batch slots;
- ``app.py``: the FastAPI app (endpoints, validation, token);
- ``wire.py``: a stream's body written straight to the connection's socket;
- ``runner.py``: ``serve`` runs it in a daemon thread and returns a handle with ``url`` and ``stop()``;
- ``client.py``: ``ActivationClient`` and the ``ActivationDataset`` for DataLoaders and ``cltlab.train``.
"""

from .client import ActivationClient, ActivationDataset, ServedBatch
from .runner import ServerHandle, serve
from .sources import DiscSource, LiveSource

__all__ = [
    "ActivationClient",
    "ActivationDataset",
    "DiscSource",
    "LiveSource",
    "ServedBatch",
    "ServerHandle",
    "serve",
]
