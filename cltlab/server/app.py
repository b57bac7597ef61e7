"""The FastAPI app of the activation server: health, info, stats, and batches as JSON, raw bytes, a stream, or
shared-memory leases.

Raw batches (``/activations/tensor``, each frame of ``/activations/stream``, a shared-memory slot) are the
``resid_mid`` rows then the ``mlp_out`` rows, ``(rows, n_layers, d_model)`` each, in the storage dtype (bfloat16
as its uint16 bits). ``/activations/tensor`` says the shape and dtype in ``X-Shape``/``X-Dtype``; a stream
frame is a 16-byte header (rows, batch index: little-endian uint64) followed by the batch.

Every query parameter is validated; a bad one gets a 4xx with a message, and the server keeps serving.
"""

import importlib
import logging
import secrets
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import NonNegativeInt


def _load_anyio() -> None:
    """Define anyio's lazily imported classes now, with nnsight's ``.save`` lifted off ``object`` if it is mounted.

    anyio refuses to define a TypedAttributeSet subclass while every object has an unannotated public ``save``
    (nnsight mounts it when imported), so a server started after a harvest would fail on its first request.
    """
    mounted = hasattr(object, "save")
    if mounted:
        from nnsight import save
        from nnsight._c import mount, unmount

        unmount("save")
    try:
        import anyio
        import anyio.abc
        import anyio.streams.tls  # noqa: F401

        for module in (anyio, anyio.abc):
            for name in dir(module):
                getattr(module, name)
        importlib.import_module("anyio._backends._asyncio")
    finally:
        if mounted:
            mount(save, "save")


_load_anyio()

from fastapi import FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402

from ..store import STORAGE_DTYPES  # noqa: E402
from .shm import ShmRing  # noqa: E402
from .sources import NoData, SourceError  # noqa: E402
from .wire import SocketStream  # noqa: E402

log = logging.getLogger("cltlab")

FRAME = struct.Struct("<QQ")  # stream frame header: rows, batch index


def host_id() -> str:
    """Identifies this machine (and boot): clients with the same id can share memory with the server."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


class ServerState:
    """What the app shares with the handle: the source, limits, counters and errors."""

    def __init__(
        self, source, *, token: str | None, max_batch_size: int, max_json_values: int, max_stream_batches: int,
        shared_memory: bool,
    ):  # fmt: skip
        self.source, self.token = source, token
        self.max_batch_size, self.max_json_values = max_batch_size, max_json_values
        self.max_stream_batches, self.shared_memory = max_stream_batches, shared_memory
        self.started = time.monotonic()
        self.batches = 0
        self.bytes = 0
        self.errors: list[BaseException] = []
        self.rings: dict[int, ShmRing] = {}
        self.lock = threading.Lock()

    def count(self, nbytes: int) -> None:
        with self.lock:
            self.batches += 1
            self.bytes += nbytes

    def ring(self, batch_size: int) -> ShmRing:
        with self.lock:
            if batch_size not in self.rings:
                self.rings[batch_size] = ShmRing(self.source, batch_size)
            return self.rings[batch_size]

    def ring_named(self, name: str) -> ShmRing | None:
        with self.lock:
            return next((ring for ring in self.rings.values() if ring.name == name), None)

    def stats(self) -> dict:
        seconds = time.monotonic() - self.started
        return {
            "batches": self.batches,
            "bytes": self.bytes,
            "seconds": seconds,
            "gb_per_s": self.bytes / seconds / 1e9 if seconds else 0.0,
            "fill": self.source.fill(),
            "shm_rings": sorted(self.rings),
            "errors": [f"{type(e).__name__}: {e}" for e in self.errors],
        }

    def close(self) -> None:
        with self.lock:
            for ring in self.rings.values():
                ring.close()
            self.rings.clear()


class TokenCheck:
    """Answers 401 to requests without ``Authorization: Bearer <token>`` (plain ASGI: a BaseHTTPMiddleware would
    pass every message of a response through a queue of its own)."""

    def __init__(self, app, *, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(sent, self.expected):
                detail = "Missing or wrong token: send the header 'Authorization: Bearer <token>'."
                await JSONResponse({"detail": detail}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    """The app serving ``state.source``."""
    source, info = state.source, state.source.info
    app = FastAPI(
        title="cltlab activation server",
        description=f"Serves {info.description}. Raw batches: resid_mid then mlp_out, (rows, n_layers, d_model).",
        version="1",
    )
    app.state.cltlab = state
    BatchSize = Annotated[int, Query(ge=1, le=state.max_batch_size, description="Rows per batch.")]
    Index = Annotated[
        int | None,
        Query(ge=0, description="Batch index (disc mode); omitted: the next batch of the shared cursor."),
    ]

    if state.token is not None:
        app.add_middleware(TokenCheck, token=state.token)

    @app.exception_handler(SourceError)
    async def bad_request(request: Request, err: SourceError):
        return JSONResponse({"detail": str(err)}, 400)

    @app.exception_handler(NoData)
    async def no_data(request: Request, err: NoData):
        return JSONResponse({"detail": str(err)}, 503)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        log.error("The activation server failed on %s: %s", request.url.path, err, exc_info=err)
        state.errors.append(err)
        return JSONResponse({"detail": f"Internal error: {type(err).__name__}: {err}"}, 500)

    def take(batch_size: int, index: int | None, out: np.ndarray | None = None):
        batch = source.take(batch_size, index, out)
        state.count(batch.data.nbytes)
        return batch

    @app.get("/health", summary="Liveness: ok, or the error that stopped the source.")
    def health() -> dict:
        error = getattr(source, "error", None)
        return {
            "status": "error" if error else "ok",
            "error": str(error) if error else None,
            "fill": source.fill(),
        }

    @app.get("/info", summary="Layers, d_model, dtype, source, normalization, batch limits, shared memory.")
    def get_info() -> dict:
        stats = source.stats
        return {
            **info._asdict(),
            "row_bytes": info.row_bytes,
            "sites": ["resid_mid", "mlp_out"],
            "normalization": None if stats is None else {k: v.tolist() for k, v in stats._asdict().items()},
            "limits": {
                "max_batch_size": state.max_batch_size,
                "max_json_values": state.max_json_values,
                "max_stream_batches": state.max_stream_batches,
            },
            "shared_memory": state.shared_memory,
            "host_id": host_id(),
        }

    @app.get("/stats", summary="Batches and bytes served, throughput, buffer fill.")
    def get_stats() -> dict:
        return state.stats()

    @app.get("/activations", summary="One batch as JSON (for people; small batches only).")
    def activations(batch_size: BatchSize = 4, index: Index = None) -> dict:
        values = batch_size * info.n_layers * info.d_model
        if values > state.max_json_values:
            raise HTTPException(
                413,
                f"batch_size {batch_size} is {values} values per site, over the JSON limit of "
                f"{state.max_json_values}; ask for fewer rows or use /activations/tensor.",
            )
        batch = take(batch_size, index)
        shape = (2, batch.rows, info.n_layers, info.d_model)
        sites = batch.data.view(STORAGE_DTYPES[info.dtype]).reshape(shape)
        if info.dtype == "bfloat16":  # bits → float32 values
            sites = (sites.astype(np.uint32) << 16).view(np.float32)
        return {
            "index": batch.index,
            "shape": list(shape[1:]),
            "dtype": info.dtype,
            "resid_mid": sites[0].tolist(),
            "mlp_out": sites[1].tolist(),
        }

    def headers(rows: int) -> dict:
        return {
            "X-Shape": f"{rows},{info.n_layers},{info.d_model}",
            "X-Dtype": info.dtype,
            "X-Sites": "resid_mid,mlp_out",
        }

    @app.get(
        "/activations/tensor",
        summary="One batch as raw bytes: resid_mid then mlp_out; shape, dtype and index in the headers.",
        response_class=Response,
    )
    def tensor(batch_size: BatchSize = 1024, index: Index = None) -> Response:
        batch = take(batch_size, index)
        return Response(
            memoryview(batch.data),
            media_type="application/octet-stream",
            headers={**headers(batch.rows), "X-Batch-Index": str(batch.index)},
        )

    @app.get(
        "/activations/stream",
        summary="A stream of raw batches, each a 16-byte header (rows, index: little-endian uint64) then the batch.",
        response_class=StreamingResponse,
    )
    def stream(
        batch_size: BatchSize = 1024,
        max_batches: Annotated[
            int | None, Query(ge=1, description="Batches to send; omitted: the server's limit.")
        ] = None,
        index: Index = None,
    ) -> SocketStream:
        count = min(max_batches or state.max_stream_batches, state.max_stream_batches)
        if max_batches is not None and max_batches > state.max_stream_batches:
            raise HTTPException(
                400, f"max_batches must be at most {state.max_stream_batches}, not {max_batches}."
            )
        first = take(batch_size, index)  # a bad request fails here, before the 200 goes out

        def frames():
            # A reader thread reads batch k + 1 into one buffer while batch k is sent from the other.
            buffers = [np.empty(2 * batch_size * info.row_bytes, np.uint8) for _ in range(2)]
            batch = first
            with ThreadPoolExecutor(1, thread_name_prefix="cltlab-stream-reader") as reader:
                for k in range(count):
                    if k + 1 < count:
                        at = None if index is None else index + k + 1
                        ahead = reader.submit(take, batch_size, at, buffers[k % 2])
                    yield [FRAME.pack(batch.rows, batch.index), batch.data]
                    if k + 1 < count:
                        batch = ahead.result()

        return SocketStream(frames(), media_type="application/octet-stream", headers=headers(batch_size))

    @app.get(
        "/shm/lease",
        summary="Same host only: lease the next batch in a shared-memory slot (see keep in the answer).",
    )
    def shm_lease(
        batch_size: BatchSize = 1024,
        pid: Annotated[
            int | None, Query(ge=1, description="The client's process id: lets it keep the slot (no copy).")
        ] = None,
    ) -> dict:
        if not state.shared_memory:
            raise HTTPException(404, "Shared memory is off on this server; use /activations/stream.")
        lease = state.ring(batch_size).lease(pid=pid)
        state.count(lease.nbytes)
        return {**lease._asdict(), "shape": [lease.rows, info.n_layers, info.d_model], "dtype": info.dtype}

    @app.get("/shm/release", summary="Give leased shared-memory slots back.")
    def shm_release(
        segment: Annotated[str, Query(max_length=64, description="The segment of the slots.")],
        slot: Annotated[list[NonNegativeInt], Query(description="Slots to give back.")],
    ) -> dict:
        ring = state.ring_named(segment)
        return {"released": [ring is not None and ring.release(s) for s in slot]}

    return app
