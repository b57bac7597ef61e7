"""``ActivationClient``: read batches from an activation server, through shared memory when on its host.

Control requests go through httpx. ``stream`` reads ``/activations/stream`` with ``http.client``, ``readinto``
straight into each batch's preallocated array (large reads, no intermediate chunks), or, when the server is on
this host, leases shared-memory slots: a batch's tensors view its slot in place (no copy), the client renews the
lease while they live, and the slot goes back to the server when the batch is garbage collected; when the ring is
short of slots the server says so and the batch is copied out instead (see ``shm.py``). When the server has no
shared memory to give (a small ``/dev/shm``), ``transport="auto"`` streams over HTTP instead. When the server
restarts or is busy (429), the client waits for it (up to ``retry_s`` seconds) and carries on where it was. The
token goes only over the scheme the URL names (``https://`` URLs use TLS on every path). ``dataset`` wraps a stream as a torch IterableDataset that
splits its batches across DataLoader workers.
"""

from __future__ import annotations

import collections
import http.client
import logging
import mmap
import time
import urllib.parse
import weakref
from collections.abc import Iterator

import httpx
import numpy as np
import torch

from ..sites import ActivationBatch, NormStats, to_torch
from ..store import STORAGE_DTYPES
from .leases import Renewer, connection, give_back
from .protocol import FRAME, SHM_UNAVAILABLE, host_id
from .shm import attach

log = logging.getLogger("cltlab")

RETRYABLE = (httpx.TransportError, ConnectionError, http.client.HTTPException, OSError)


class ServerError(RuntimeError):
    """The server answered a 4xx or 5xx; ``status`` and ``headers`` (lowercase names) are its answer's."""

    def __init__(self, message: str, status: int, headers: dict[str, str]):
        super().__init__(message)
        self.status, self.headers = status, {name.lower(): value for name, value in headers.items()}


def to_batch(data: np.ndarray, rows: int, index: int, info: dict) -> ActivationBatch:
    """Wire bytes (resid_mid then mlp_out) → an ActivationBatch sharing their memory; ``index`` is the batch's
    index in the server's sequence."""
    dtype = info["dtype"]
    sites = data.view(STORAGE_DTYPES[dtype]).reshape(2, rows, info["n_layers"], info["d_model"])
    both = to_torch(sites, dtype)
    return ActivationBatch(both[0], both[1], index)


class ActivationClient:
    """Talks to an activation server at ``url`` (``token`` when it asks for one).

    ``transport``: ``auto`` (shared memory when the server is on this host, else HTTP), ``shm`` or ``http``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        transport: str = "auto",
        timeout: float = 60.0,
        retry_s: float = 30.0,
    ):
        if transport not in ("auto", "shm", "http"):
            raise ValueError(f"transport must be 'auto', 'shm' or 'http', not {transport!r}.")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"The server URL must start with http:// or https://, not {url!r}.")
        self.url, self.token, self.transport, self.timeout, self.retry_s = (
            url.rstrip("/"),
            token,
            transport,
            timeout,
            retry_s,
        )
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout)
        self._info: dict | None = None
        self._mappings: dict[str, mmap.mmap] = {}

    # ------------------------------------------------------------------------------------------ control

    def _get(self, path: str, **params) -> httpx.Response:
        return self._request("GET", path, params=params)

    def _request(self, method: str, path: str, *, params: dict | None = None, body=None) -> httpx.Response:
        """A request, retried while the server is unreachable, busy (429) or has no batch ready (503); a 4xx/5xx
        raises ServerError."""
        deadline = time.monotonic() + self.retry_s
        params = {k: v for k, v in (params or {}).items() if v is not None}
        while True:
            try:
                response = self._http.request(method, path, params=params, json=body)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"The activation server at {self.url} is unreachable.") from None
                time.sleep(0.2)
                continue
            busy = response.status_code == 429 or (
                response.status_code == 503 and SHM_UNAVAILABLE not in response.headers
            )  # 503: no batch ready yet (a live harvester warming up)
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ServerError(
                f"{self.url}{path} answered {response.status_code}: {detail}",
                response.status_code,
                dict(response.headers),
            )
        return response

    def health(self) -> dict:
        return self._get("/health").json()

    def info(self) -> dict:
        """What the server serves: layers, d_model, dtype, source, normalization, limits (cached)."""
        if self._info is None:
            self._info = self._get("/info").json()
        return self._info

    def stats(self) -> dict:
        return self._get("/stats").json()

    @property
    def normalization(self) -> NormStats | None:
        norm = self.info()["normalization"]
        return None if norm is None else NormStats(**{k: torch.tensor(v) for k, v in norm.items()})

    def wait_for_data(self, timeout: float = 60.0) -> dict:
        """Wait until the server is up and has a batch ready (a live harvester warms up first); return its info."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = self.health()
                if health["error"]:
                    raise RuntimeError(f"The activation server reports: {health['error']}")
                if health["fill"] > 0:
                    self._info = None
                    return self.info()
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"No data at {self.url} within {timeout:.0f} s.")
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------------ batches

    def json(self, batch_size: int = 4, index: int | None = None) -> dict:
        """One batch as the server's JSON (nested lists)."""
        return self._get("/activations", batch_size=batch_size, index=index).json()

    def tensor(self, batch_size: int = 1024, index: int | None = None) -> ActivationBatch:
        """One batch as raw bytes."""
        response = self._get("/activations/tensor", batch_size=batch_size, index=index)
        rows = int(response.headers["X-Shape"].split(",")[0])
        data = np.frombuffer(response.content, np.uint8).copy()
        return to_batch(data, rows, int(response.headers["X-Batch-Index"]), self.info())

    @property
    def same_host(self) -> bool:
        """True when the server offers shared memory on this machine."""
        info = self.info()
        return bool(info["shared_memory"]) and info["host_id"] == host_id()

    def stream(
        self,
        batch_size: int = 1024,
        max_batches: int | None = None,
        *,
        index: int | None = None,
        transport: str | None = None,
    ) -> Iterator[ActivationBatch]:
        """Batches one after the other (``max_batches`` of them, or until the server's limit)."""
        transport = transport or self.transport
        fallback = transport == "auto"  # to HTTP, when the server has no shared memory to give
        if transport == "auto":
            transport = "shm" if self.same_host else "http"
        if transport == "shm":
            if index is not None:
                raise ValueError(
                    "index needs transport='http': shared memory serves the shared cursor's batches."
                )
            return self._stream_shm(batch_size, max_batches, fallback=fallback)
        return self._stream_http(batch_size, max_batches, index)

    def _stream_http(
        self, batch_size: int, max_batches: int | None, index: int | None
    ) -> Iterator[ActivationBatch]:
        info, received = self.info(), 0
        memory = Recycler(FRAME.size + 2 * batch_size * info["row_bytes"])
        deadline = None
        while max_batches is None or received < max_batches:
            params = {"batch_size": batch_size}
            if max_batches is not None:
                params["max_batches"] = max_batches - received
            if index is not None:
                params["index"] = index + received
            stream = connection(self.url, self.timeout)
            try:
                stream.request(
                    "GET", f"/activations/stream?{urllib.parse.urlencode(params)}", headers=self._headers
                )
                response = stream.getresponse()
                if response.status == 429:  # busy: as if the connection broke
                    response.read()
                    raise ConnectionError("the server is busy (429)")
                if response.status >= 400:
                    raise ServerError(
                        f"{self.url}/activations/stream answered {response.status}: {response.read()!r}",
                        response.status,
                        dict(response.getheaders()),
                    )
                while max_batches is None or received < max_batches:
                    block = memory.block()  # the frame's header, then its batch, read into one block
                    if _read_exactly(response, memoryview(block)[: FRAME.size]) == 0:
                        memory.give_back(block)
                        return  # the server's limit: the stream ended cleanly between frames
                    rows, batch_index = FRAME.unpack_from(block)
                    batch = _receive(response, memory, block, rows, batch_index, info)
                    received += 1
                    deadline = None
                    yield batch
                    del batch  # its memory goes round again once the consumer lets go of it
                return
            except RETRYABLE as err:
                deadline = deadline or time.monotonic() + self.retry_s
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Lost the stream from {self.url}: {err}") from err
                log.warning("Stream from %s interrupted (%s); reconnecting", self.url, err)
                time.sleep(0.2)
            finally:
                stream.close()

    def _stream_shm(
        self, batch_size: int, max_batches: int | None, *, fallback: bool
    ) -> Iterator[ActivationBatch]:
        info, received = self.info(), 0
        while max_batches is None or received < max_batches:
            try:
                lease = self._request(
                    "POST", "/shm/lease", params={"batch_size": batch_size, "keep": True}
                ).json()
            except ServerError as err:
                if not (fallback and SHM_UNAVAILABLE.lower() in err.headers):
                    raise
                log.warning("%s; streaming over HTTP instead.", err)
                left = None if max_batches is None else max_batches - received
                yield from self._stream_http(batch_size, left, None)
                return
            try:
                self._mapping(lease["segment"])
            except FileNotFoundError:  # the server freed the ring just now: its lease is void
                continue
            received += 1
            # Not kept in a local: the slot goes back as soon as the consumer is done with the batch.
            yield self._leased_batch(lease, info)

    def _leased_batch(self, lease: dict, info: dict) -> ActivationBatch:
        data = np.frombuffer(self._mapping(lease["segment"]), np.uint8, lease["nbytes"], lease["offset"])
        if lease["keep"]:  # the batch is the slot itself: renewed while it lives, given back once collected
            Renewer.of(self.url, self._headers).add(lease["lease"], lease["expires_s"])
            release = weakref.finalize(data, give_back, self.url, self._headers, lease["lease"])
            release.atexit = False  # an exiting client's leases expire on the server
        else:  # the ring is short of slots: copy the batch out and give the slot back now
            data = data.copy()
            self._request("POST", "/shm/release", body={"leases": [lease["lease"]]})
        return to_batch(data, lease["rows"], lease["index"], info)

    def _mapping(self, name: str) -> mmap.mmap:
        if name not in self._mappings:  # a restarted server has a new segment: forget the old one
            self._mappings = {name: attach(name)}
        return self._mappings[name]

    def dataset(self, batch_size: int = 1024, max_batches: int | None = None) -> ActivationDataset:
        """A torch IterableDataset of this server's batches."""
        return ActivationDataset(
            self.url, batch_size, max_batches, token=self.token, transport=self.transport
        )

    def close(self) -> None:
        self._mappings = {}  # unmapped once the last batch viewing them is gone
        self._http.close()

    def __enter__(self) -> ActivationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Recycler:
    """Memory for the next batches, taken back from batches the consumer let go.

    Before receiving into fresh memory the kernel maps and zeroes every page of it; a training loop drops each
    batch before it asks for the next, so a few arrays can go round instead. A batch's array is its own
    ``np.frombuffer`` view (numpy ends chains of views there), so its memory comes back only once every tensor
    made from it is gone.
    """

    def __init__(self, nbytes: int, keep: int = 2):
        self.nbytes = nbytes
        self.free: collections.deque[np.ndarray] = collections.deque(maxlen=keep)

    def block(self) -> np.ndarray:
        """``nbytes`` (given at construction) of memory, let go or new."""
        try:
            return self.free.pop()
        except IndexError:
            return np.empty(self.nbytes, np.uint8)

    def array(self, block: np.ndarray, nbytes: int, offset: int = 0) -> np.ndarray:
        """A uint8 array of ``block[offset : offset + nbytes]``; ``block`` goes round again once it is let go."""
        data = np.frombuffer(memoryview(block), np.uint8, nbytes, offset)
        weakref.finalize(data, self.give_back, block)
        return data

    def give_back(self, block: np.ndarray) -> None:
        """``block`` may be handed out again."""
        self.free.append(block)


def _receive(
    response, memory: Recycler, block: np.ndarray, rows: int, index: int, info: dict
) -> ActivationBatch:
    """The batch of a stream frame whose header starts ``block``, read straight into the block after it (one
    buffer for both: a separate header buffer made the large reads into the batch half as fast here)."""
    data = memory.array(block, 2 * rows * info["row_bytes"], FRAME.size)
    if _read_exactly(response, memoryview(data)) != data.nbytes:
        raise ConnectionError("The stream ended inside a batch.")
    return to_batch(data, rows, index, info)


def _read_exactly(response: http.client.HTTPResponse, view: memoryview) -> int:
    """Fill ``view`` from the response with large ``readinto`` calls; the bytes read (less only at the end)."""
    got = 0
    while got < view.nbytes:
        n = response.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class ActivationDataset(torch.utils.data.IterableDataset):
    """Batches from an activation server; DataLoader workers each take their share of ``max_batches``.

    Use with ``DataLoader(dataset, batch_size=None)``. ``n_layers``, ``d_model``, ``layer_start`` and ``stats``
    (normalization) describe the served activations, like a DiscBuffer's, so ``cltlab.train`` accepts it.
    """

    def __init__(
        self,
        url: str,
        batch_size: int = 1024,
        max_batches: int | None = None,
        *,
        token=None,
        transport="auto",
    ):
        self.url, self.batch_size, self.max_batches, self.token, self.transport = (
            url,
            batch_size,
            max_batches,
            token,
            transport,
        )
        with ActivationClient(url, token=token) as client:
            info = client.wait_for_data()
            self.n_layers, self.d_model, self.layer_start = (
                info["n_layers"],
                info["d_model"],
                info["layer_start"],
            )
            self.dtype, self.origin = info["dtype"], info.get("origin")
            self.stats = client.normalization

    def __iter__(self) -> Iterator[ActivationBatch]:
        worker = torch.utils.data.get_worker_info()
        count = self.max_batches
        if worker is not None and count is not None:
            count = count // worker.num_workers + (worker.id < count % worker.num_workers)
        with ActivationClient(self.url, token=self.token, transport=self.transport) as client:
            yield from client.stream(self.batch_size, count)
