"""``ActivationClient``: read batches from an activation server, through shared memory when on its host.

Control requests go through httpx. ``stream`` reads ``/activations/stream`` with ``http.client``, ``readinto``
straight into each batch's preallocated array (large reads, no intermediate chunks), or, when the server is on
this host, leases shared-memory slots and copies each batch out of the segment. When the server restarts, the
client waits for it (up to ``retry_s`` seconds) and carries on where it was. ``dataset`` wraps a stream as a torch
IterableDataset that splits its batches across DataLoader workers.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.parse
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import numpy as np
import torch

from ..buffer import NormStats, to_torch
from ..store import STORAGE_DTYPES
from .app import FRAME, host_id
from .shm import attach

log = logging.getLogger("cltlab")

RETRYABLE = (httpx.TransportError, ConnectionError, http.client.HTTPException, OSError)


class ServedBatch(NamedTuple):
    """One batch from the server (training reads ``resid_mid``/``mlp_out`` like a DiscBuffer batch)."""

    resid_mid: torch.Tensor
    """``(rows, n_layers, d_model)`` in the storage dtype."""
    mlp_out: torch.Tensor
    """``(rows, n_layers, d_model)``"""
    index: int
    """The batch's index in the server's sequence."""


def to_batch(data: np.ndarray, rows: int, index: int, info: dict) -> ServedBatch:
    """Wire bytes (resid_mid then mlp_out) → a ServedBatch sharing their memory."""
    dtype = info["dtype"]
    sites = data.view(STORAGE_DTYPES[dtype]).reshape(2, rows, info["n_layers"], info["d_model"])
    both = to_torch(sites, dtype)
    return ServedBatch(both[0], both[1], index)


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
        self._segments: dict = {}

    # ------------------------------------------------------------------------------------------ control

    def _get(self, path: str, **params) -> httpx.Response:
        """GET with retries while the server is unreachable; a 4xx/5xx raises with the server's message."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                response = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise ConnectionError(f"The activation server at {self.url} is unreachable.") from None
                time.sleep(0.2)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise RuntimeError(f"{self.url}{path} answered {response.status_code}: {detail}")
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

    def tensor(self, batch_size: int = 1024, index: int | None = None) -> ServedBatch:
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
    ) -> Iterator[ServedBatch]:
        """Batches one after the other (``max_batches`` of them, or until the server's limit)."""
        transport = transport or self.transport
        if transport == "auto":
            transport = "shm" if self.same_host else "http"
        if transport == "shm":
            if index is not None:
                raise ValueError(
                    "index needs transport='http': shared memory serves the shared cursor's batches."
                )
            return self._stream_shm(batch_size, max_batches)
        return self._stream_http(batch_size, max_batches, index)

    def _stream_http(
        self, batch_size: int, max_batches: int | None, index: int | None
    ) -> Iterator[ServedBatch]:
        info, received = self.info(), 0
        parts = urllib.parse.urlsplit(self.url)
        header = bytearray(FRAME.size)
        deadline = None
        while max_batches is None or received < max_batches:
            params = {"batch_size": batch_size}
            if max_batches is not None:
                params["max_batches"] = max_batches - received
            if index is not None:
                params["index"] = index + received
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.timeout)
            try:
                connection.request(
                    "GET", f"/activations/stream?{urllib.parse.urlencode(params)}", headers=self._headers
                )
                response = connection.getresponse()
                if response.status >= 400:
                    raise RuntimeError(
                        f"{self.url}/activations/stream answered {response.status}: {response.read()!r}"
                    )
                while max_batches is None or received < max_batches:
                    if _read_exactly(response, memoryview(header)) == 0:
                        return  # the server's limit: the stream ended cleanly between frames
                    rows, batch_index = FRAME.unpack(header)
                    data = np.empty(2 * rows * info["row_bytes"], np.uint8)
                    if _read_exactly(response, memoryview(data)) != data.nbytes:
                        raise ConnectionError("The stream ended inside a batch.")
                    received += 1
                    deadline = None
                    yield to_batch(data, rows, batch_index, info)
                return
            except RETRYABLE as err:
                deadline = deadline or time.monotonic() + self.retry_s
                if time.monotonic() > deadline:
                    raise ConnectionError(f"Lost the stream from {self.url}: {err}") from err
                log.warning("Stream from %s interrupted (%s); reconnecting", self.url, err)
                time.sleep(0.2)
            finally:
                connection.close()

    def _stream_shm(self, batch_size: int, max_batches: int | None) -> Iterator[ServedBatch]:
        info, received, held = self.info(), 0, None
        try:
            while max_batches is None or received < max_batches:
                params = {"batch_size": batch_size}
                if held is not None:
                    params.update(release=held[1], segment=held[0])
                lease = self._get("/shm/lease", **params).json()
                held = (lease["segment"], lease["slot"])
                segment = self._segment(lease["segment"])
                data = np.empty(lease["nbytes"], np.uint8)
                data[:] = np.frombuffer(segment.buf, np.uint8, lease["nbytes"], lease["offset"])
                received += 1
                yield to_batch(data, lease["rows"], lease["index"], info)
        finally:
            if held is not None:
                try:
                    self._http.get(
                        "/shm/release", params={"batch_size": batch_size, "slot": held[1], "segment": held[0]}
                    )
                except httpx.TransportError:
                    pass  # the server is gone; its lease expires with it

    def _segment(self, name: str):
        if name not in self._segments:
            for old in self._segments.values():  # a restarted server: drop the old mappings
                old.close()
            self._segments = {name: attach(name)}
        return self._segments[name]

    def dataset(self, batch_size: int = 1024, max_batches: int | None = None) -> ActivationDataset:
        """A torch IterableDataset of this server's batches."""
        return ActivationDataset(
            self.url, batch_size, max_batches, token=self.token, transport=self.transport
        )

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments = {}
        self._http.close()

    def __enter__(self) -> ActivationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            self.dtype = info["dtype"]
            self.stats = client.normalization

    def __iter__(self) -> Iterator[ServedBatch]:
        worker = torch.utils.data.get_worker_info()
        count = self.max_batches
        if worker is not None and count is not None:
            count = count // worker.num_workers + (worker.id < count % worker.num_workers)
        with ActivationClient(self.url, token=self.token, transport=self.transport) as client:
            yield from client.stream(self.batch_size, count)

    def check_compatible(self, n_layers: int, d_model: int, *, what: str = "the CLT") -> None:
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise ValueError(
                f"{self.url} serves {self.n_layers} layers of d_model {self.d_model}, but {what} has "
                f"{n_layers} layers of d_model {d_model}."
            )
