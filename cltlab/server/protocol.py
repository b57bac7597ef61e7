"""What the activation server and its clients agree on: the wire format, the replies, and what a source is.

Raw batches (``/activations/tensor``, each frame of ``/activations/stream``, a shared-memory slot) are the
``resid_mid`` rows then the ``mlp_out`` rows, ``(rows, n_layers, d_model)`` each, in the storage dtype (bfloat16
as its uint16 bits). A stream frame is a ``FRAME`` header (rows, batch index: little-endian uint64) followed by
the batch. The JSON replies are the pydantic models below, so they appear in the server's OpenAPI document.

This module imports neither FastAPI nor the app: the client and the sources build on it.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Annotated, NamedTuple, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from ..sites import NormStats, row_bytes

FRAME = struct.Struct("<QQ")  # stream frame header: rows, batch index
SITES = ("resid_mid", "mlp_out")
LEASE_ID_CHARS = 64  # a lease id is at most this long (secrets.token_urlsafe(24) is 32)
SHM_UNAVAILABLE = "X-Cltlab-Shm"  # the header of a 503 that means "no shared memory here: use HTTP"


def host_id() -> str:
    """Identifies this machine (and boot): clients with the same id can share memory with the server."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


# ---------------------------------------------------------------------------------------------- sources


class SourceError(ValueError):
    """A request the source cannot satisfy (bad batch size, an index in live mode); the server answers 400."""


class NoData(RuntimeError):
    """No batch became available in time (live mode warming up, a stopped source); the server answers 503."""


class WireBatch(NamedTuple):
    """One batch as the bytes a source writes and the server sends, ready to go on the wire.

    Not the rows as tensors: the client turns these bytes into a ``sites.ActivationBatch`` (``client.to_batch``),
    the one type training reads.
    """

    index: int
    """Its index in the source's batch sequence."""
    rows: int
    """Rows in the batch."""
    data: np.ndarray
    """``(2 * rows * row_bytes,)`` uint8: resid_mid then mlp_out, in the storage dtype."""


class FileRange(NamedTuple):
    """Bytes of an open file, sent as they are (``os.sendfile``: no copy through the server's memory)."""

    fd: int
    offset: int
    nbytes: int


class RangedBatch(NamedTuple):
    """A ``WireBatch`` as the byte ranges of the files that hold it (a disc source's batches), in wire order."""

    index: int
    rows: int
    parts: list[FileRange]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


class SourceInfo(NamedTuple):
    """What a source holds."""

    kind: str
    """``disc`` or ``live``."""
    description: str
    """One line of provenance."""
    n_layers: int
    """Layers per row."""
    d_model: int
    """Width of each layer's vector."""
    layer_start: int
    """Index in the model of the first layer."""
    dtype: str
    """Storage dtype: ``float32``, ``float16`` or ``bfloat16`` (sent as its uint16 bits)."""
    n_tokens: int | None
    """Rows in the source (None in live mode: unbounded)."""
    origin: dict | None = None
    """What the rows were harvested from: ``model``, ``corpus``, ``seq_len`` (None: not known)."""

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of one site."""
        return row_bytes(self.n_layers, self.d_model, self.dtype)

    def batch_bytes(self, rows: int) -> int:
        """Bytes of a batch of ``rows`` rows on the wire (both sites)."""
        return 2 * rows * self.row_bytes


@runtime_checkable
class Source(Protocol):
    """What the server serves: batches of bytes by index (disc mode) or in order (live mode)."""

    info: SourceInfo

    @property
    def alive(self) -> bool:
        """False once the source can give no more batches (a live harvester that stopped)."""

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the source, if any."""

    @property
    def stats(self) -> NormStats | None:
        """Normalization statistics (None before any are known)."""

    def check(self, batch_size: int, index: int | None = None) -> None:
        """Raise SourceError when ``take(batch_size, index)`` can never succeed; allocates nothing."""

    def take(self, batch_size: int, index: int | None = None, out: np.ndarray | None = None) -> WireBatch:
        """Batch ``index`` (the next one when None), read straight into ``out`` when it is large enough."""

    def fill(self) -> float:
        """Fraction of the source ready to serve."""

    def close(self) -> None:
        """Free what the source holds."""


# ---------------------------------------------------------------------------------------------- replies


class ErrorReply(BaseModel):
    """Every 4xx and 5xx answer."""

    detail: str = Field(description="What was wrong and what to do.")


class Health(BaseModel):
    status: str = Field(description="``ok``, or ``error`` once the source stopped.")
    error: str | None = Field(description="The error that stopped the source.")
    fill: float = Field(description="Fraction of the source ready to serve.")


class Origin(BaseModel):
    model: str
    corpus: str
    seq_len: int


class Normalization(BaseModel):
    input_mean: list[list[float]]
    input_scale: list[list[float]]
    output_mean: list[list[float]]
    output_scale: list[list[float]]


class Limits(BaseModel):
    """The server's budgets; a request beyond one is answered 413 (too large) or 429 (too many at once)."""

    max_batch_size: int = Field(65536, ge=1, description="Rows per batch.")
    max_reply_bytes: int = Field(2**29, ge=1, description="Bytes of one batch on the wire (both sites).")
    max_json_values: int = Field(65536, ge=1, description="Values per site of /activations.")
    max_stream_batches: int = Field(1_000_000, ge=1, description="Batches of one /activations/stream.")
    max_streams: int = Field(8, ge=1, description="Streams at once.")
    max_inflight_bytes: int = Field(2**31, ge=1, description="Bytes of batches being read or sent at once.")
    max_rings: int = Field(4, ge=1, description="Shared-memory rings (one per batch size) at once.")
    max_shm_bytes: int = Field(2**32, ge=1, description="Bytes of shared memory of all rings together.")
    lease_s: float = Field(30.0, gt=0, description="Seconds a shared-memory lease lasts unless renewed.")
    max_errors: int = Field(100, ge=1, description="Errors kept for /stats and the handle (the latest ones).")


class Info(BaseModel):
    kind: str = Field(description="``disc`` or ``live``.")
    description: str
    n_layers: int
    d_model: int
    layer_start: int
    dtype: str = Field(description="Storage dtype (bfloat16 travels as its uint16 bits).")
    n_tokens: int | None = Field(description="Rows in the source (None in live mode).")
    origin: Origin | None = Field(None, description="What the rows were harvested from, where known.")
    row_bytes: int = Field(description="Bytes of one row of one site.")
    sites: list[str]
    normalization: Normalization | None
    limits: Limits
    shared_memory: bool = Field(description="Whether /shm/lease is offered.")
    host_id: str = Field(description="Clients with the same host id may use shared memory.")


class Stats(BaseModel):
    batches: int
    bytes: int
    seconds: float
    gb_per_s: float
    fill: float
    shm_rings: list[int] = Field(description="Batch sizes that have a shared-memory ring now.")
    inflight_bytes: int
    streams: int
    errors: list[str] = Field(description="The latest errors (a bounded list).")


class JsonBatch(BaseModel):
    index: int
    shape: list[int]
    dtype: str
    resid_mid: list
    mlp_out: list


class LeaseReply(BaseModel):
    """Where a leased batch lies in shared memory; give it back with /shm/release."""

    lease: str = Field(description="The lease's id: only its holder knows it; release and renew with it.")
    segment: str = Field(description="Name of the shared-memory segment.")
    slot: int
    offset: int = Field(description="Byte offset of the batch in the segment.")
    nbytes: int
    index: int = Field(description="The batch's index in the source's sequence.")
    rows: int
    keep: bool = Field(
        description="True: use the slot in place (renew it); False: copy it out, release at once."
    )
    expires_s: float = Field(description="Seconds until the slot is reclaimed unless renewed or released.")
    shape: list[int]
    dtype: str


LeaseId = Annotated[str, Field(max_length=LEASE_ID_CHARS, pattern=r"^[A-Za-z0-9_-]*$")]


class LeaseIds(BaseModel):
    leases: list[LeaseId] = Field(max_length=256, description="Ids of leases (from /shm/lease).")


class Released(BaseModel):
    released: list[bool] = Field(description="Per id: True when it was a lease still held.")


class Renewed(BaseModel):
    renewed: list[bool] = Field(description="Per id: True when the lease is still held and now lasts longer.")
