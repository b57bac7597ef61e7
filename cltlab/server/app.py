"""The FastAPI app of the activation server: health, info, stats, and batches as JSON, raw bytes, a stream, or
shared-memory leases. The wire format and the replies are in ``protocol.py``; the budgets in ``state.py``.

Every parameter is validated, and every budget checked, before anything is allocated; a bad request gets a 4xx
with a message (each documented in the OpenAPI document), and the server keeps serving. An unexpected error is
answered 500 with an id that the ``cltlab`` logger prints beside the traceback.
"""

import importlib
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import numpy as np


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

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from ..store import STORAGE_DTYPES  # noqa: E402
from .protocol import (  # noqa: E402
    FRAME,
    SHM_UNAVAILABLE,
    SITES,
    ErrorReply,
    Health,
    Info,
    JsonBatch,
    LeaseIds,
    LeaseReply,
    NoData,
    Normalization,
    Released,
    Renewed,
    SourceError,
    Stats,
    host_id,
)
from .shm import RingBusy, ShmFull  # noqa: E402
from .state import ServerState, TooBusy, TooLarge  # noqa: E402
from .wire import SocketStream, ranged_stream  # noqa: E402

log = logging.getLogger("cltlab")

MAX_ROWS = 2**31  # the widest batch_size a request may name (the server's own limits are lower)
MAX_INDEX = 2**62  # the largest batch index a request may name (frame headers are uint64)


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorReply} for status in statuses}


# Answers any route may give: no or a wrong token (401), a Host header this server does not answer to (421).
COMMON = _errors(401, 421)
BATCH = _errors(400, 413, 429, 503)

BatchSize = Annotated[int, Query(ge=1, le=MAX_ROWS, description="Rows per batch.")]
Index = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_INDEX,
        description="Batch index (disc mode); omitted: the next batch of the shared cursor.",
    ),
]


def get_state(request: Request) -> ServerState:
    return request.app.state.cltlab


State = Annotated[ServerState, Depends(get_state)]
router = APIRouter(responses=COMMON)


class ReleasingResponse(Response):
    """A response that gives its reservation back once sent (or failed)."""

    def __init__(self, content, *, release, **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _headers(state: ServerState, rows: int) -> dict:
    info = state.source.info
    return {
        "X-Shape": f"{rows},{info.n_layers},{info.d_model}",
        "X-Dtype": info.dtype,
        "X-Sites": ",".join(SITES),
    }


@router.get("/health", summary="Liveness: ok, or the error that stopped the source.")
def health(state: State) -> Health:
    error = state.source.error
    return Health(
        status="error" if error else "ok", error=str(error) if error else None, fill=state.source.fill()
    )


@router.get("/info", summary="Layers, d_model, dtype, source, normalization, limits, shared memory.")
def get_info(state: State) -> Info:
    info, stats = state.source.info, state.source.stats
    return Info(
        **info._asdict(),
        row_bytes=info.row_bytes,
        sites=list(SITES),
        normalization=None
        if stats is None
        else Normalization(**{k: v.tolist() for k, v in stats._asdict().items()}),
        limits=state.limits,
        shared_memory=state.shared_memory,
        host_id=host_id(),
    )


@router.get("/stats", summary="Batches and bytes served, throughput, buffer fill, latest errors.")
def get_stats(state: State) -> Stats:
    return state.stats()


@router.get("/activations", summary="One batch as JSON (for people; small batches only).", responses=BATCH)
def activations(state: State, batch_size: BatchSize = 4, index: Index = None) -> JsonBatch:
    info = state.source.info
    state.source.check(batch_size, index)
    values = batch_size * info.n_layers * info.d_model
    if values > state.limits.max_json_values:
        raise TooLarge(
            f"batch_size {batch_size} is {values} values per site, over the JSON limit of "
            f"{state.limits.max_json_values}; ask for fewer rows or use /activations/tensor."
        )
    reservation = state.reserve(state.check_reply(batch_size, index))
    try:
        batch = state.source.take(batch_size, index)
    finally:
        reservation.release()
    state.count(batch.data.nbytes)
    shape = (2, batch.rows, info.n_layers, info.d_model)
    sites = batch.data.view(STORAGE_DTYPES[info.dtype]).reshape(shape)
    if info.dtype == "bfloat16":  # bits → float32 values
        sites = (sites.astype(np.uint32) << 16).view(np.float32)
    return JsonBatch(
        index=batch.index,
        shape=list(shape[1:]),
        dtype=info.dtype,
        resid_mid=sites[0].tolist(),
        mlp_out=sites[1].tolist(),
    )


@router.get(
    "/activations/tensor",
    summary="One batch as raw bytes: resid_mid then mlp_out; shape, dtype and index in the headers.",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **BATCH},
)
def tensor(state: State, batch_size: BatchSize = 1024, index: Index = None) -> Response:
    reservation = state.reserve(state.check_reply(batch_size, index))
    try:
        batch = state.source.take(batch_size, index)
    except BaseException:
        reservation.release()
        raise
    state.count(batch.data.nbytes)
    return ReleasingResponse(
        memoryview(batch.data),
        release=reservation.release,
        media_type="application/octet-stream",
        headers={**_headers(state, batch.rows), "X-Batch-Index": str(batch.index)},
    )


@router.get(
    "/activations/stream",
    summary="A stream of raw batches, each a 16-byte header (rows, index: little-endian uint64) then the batch.",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **BATCH},
)
def stream(
    state: State,
    batch_size: BatchSize = 1024,
    max_batches: Annotated[
        int | None, Query(ge=1, le=MAX_INDEX, description="Batches to send; omitted: the server's limit.")
    ] = None,
    index: Index = None,
) -> Response:
    limit = state.limits.max_stream_batches
    if max_batches is not None and max_batches > limit:
        raise HTTPException(400, f"max_batches must be at most {limit}, not {max_batches}.")
    count = max_batches or limit
    nbytes = state.check_reply(batch_size, index)
    ranges = getattr(state.source, "ranges", None)
    if ranges is not None:
        return ranged_stream(
            state, ranges, batch_size, count, index, nbytes, headers=_headers(state, batch_size)
        )
    # Two buffers: a reader thread reads batch k + 1 into one while batch k is sent from the other.
    reservation = state.reserve(2 * nbytes, stream=True)
    try:
        buffers = [np.empty(nbytes, np.uint8) for _ in range(2)]
        first = state.source.take(batch_size, index, buffers[0])  # a bad request fails here, before the 200
    except BaseException:
        reservation.release()
        raise

    def take(k: int):
        batch = state.source.take(batch_size, None if index is None else index + k, buffers[k % 2])
        state.count(batch.data.nbytes)
        return batch

    def frames():
        state.count(first.data.nbytes)
        batch = first
        with ThreadPoolExecutor(1, thread_name_prefix="cltlab-stream-reader") as reader:
            for k in range(count):
                ahead = reader.submit(take, k + 1) if k + 1 < count else None
                yield [FRAME.pack(batch.rows, batch.index), batch.data]
                if ahead is not None:
                    batch = ahead.result()

    return SocketStream(
        frames(),
        release=reservation.release,
        media_type="application/octet-stream",
        headers=_headers(state, batch_size),
    )


@router.post(
    "/shm/lease",
    summary="Same host only: lease the next batch in a shared-memory slot (see keep and expires_s in the answer).",
    responses={**_errors(400, 404, 413, 429), 503: {"model": ErrorReply, "description": "No batch ready, or no "
               f"shared memory for this ring (then the header {SHM_UNAVAILABLE}: use HTTP)."}},
)  # fmt: skip
def shm_lease(
    state: State,
    batch_size: BatchSize = 1024,
    keep: Annotated[
        bool, Query(description="Use the slot in place, renew it, release it when done.")
    ] = False,
) -> LeaseReply:
    if not state.shared_memory:
        raise HTTPException(404, "Shared memory is off on this server; use /activations/stream.")
    state.check_reply(batch_size)
    lease = state.ring(batch_size).lease(keep=keep)
    state.count(lease.nbytes)
    info = state.source.info
    return LeaseReply(**lease._asdict(), shape=[lease.rows, info.n_layers, info.d_model], dtype=info.dtype)


@router.post(
    "/shm/release", summary="Give leased shared-memory slots back (by lease id).", responses=_errors(400)
)
def shm_release(state: State, ids: LeaseIds) -> Released:
    rings = state.rings_now()
    return Released(released=[any(ring.release(lease) for ring in rings) for lease in ids.leases])


@router.post(
    "/shm/renew",
    summary="Keep leased shared-memory slots for another lease_s seconds (by lease id).",
    responses=_errors(400),
)
def shm_renew(state: State, ids: LeaseIds) -> Renewed:
    rings = state.rings_now()
    return Renewed(renewed=[any(ring.renew(lease) for ring in rings) for lease in ids.leases])


# ---------------------------------------------------------------------------------------------- errors

STATUS = {SourceError: 400, TooLarge: 413, TooBusy: 429, RingBusy: 429, NoData: 503, ShmFull: 503}


async def _known_error(request: Request, err: Exception) -> JSONResponse:
    headers = {SHM_UNAVAILABLE: "unavailable"} if isinstance(err, ShmFull) else None
    return JSONResponse({"detail": str(err)}, STATUS[type(err)], headers=headers)


async def _server_error(request: Request, err: Exception) -> JSONResponse:
    error_id = secrets.token_hex(6)
    log.error(
        "The activation server failed on %s (error %s): %s", request.url.path, error_id, err, exc_info=err
    )
    request.app.state.cltlab.errors.append(err)
    return JSONResponse({"detail": f"Internal error {error_id}; the server's log has the details."}, 500)


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


class HostCheck:
    """Answers 421 to requests whose Host header names another server: a web page whose name was made to resolve
    to 127.0.0.1 (DNS rebinding) then reaches nothing."""

    def __init__(self, app, *, allowed: set[str]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = (
                host[: host.index("]") + 1]
                if host.startswith("[") and "]" in host
                else host.rsplit(":", 1)[0]
            )
            if name not in self.allowed:
                detail = (
                    f"This server does not answer to the host {host!r}; use one of {sorted(self.allowed)}."
                )
                await JSONResponse({"detail": detail}, 421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    """The app serving ``state.source``."""
    app = FastAPI(
        title="cltlab activation server",
        description=f"Serves {state.source.info.description}. Raw batches: resid_mid then mlp_out, "
        "(rows, n_layers, d_model).",
        version="2",
    )
    app.state.cltlab = state
    app.include_router(router)
    for error in STATUS:
        app.add_exception_handler(error, _known_error)
    app.add_exception_handler(Exception, _server_error)
    if state.token is not None:
        app.add_middleware(TokenCheck, token=state.token)
    if state.allowed_hosts is not None:  # outermost: checked before the token
        app.add_middleware(HostCheck, allowed=state.allowed_hosts)
    return app
