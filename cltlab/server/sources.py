"""What an activation server serves: batches from a DiscBuffer (disc mode) or from a model running now (live mode).

A batch on the wire is the ``resid_mid`` rows followed by the ``mlp_out`` rows, both ``(rows, n_layers, d_model)``
in the storage dtype (bfloat16 as its 2-byte bits), back to back in one byte buffer.

- **Disc mode** (``DiscSource``): batch ``index`` of size ``batch_size`` is ``DiscBuffer(path,
  batch_size=batch_size, seed=seed)[index % len(buffer)]``, byte for byte. Requests without an index take the
  next index of a shared cursor (one per batch size), so concurrent clients get disjoint batches.
- **Live mode** (``LiveSource``): a harvester thread runs the model on the corpus and appends rows to a bounded
  ring as batches are taken. The harvest order is: for each forward batch ``ids`` ``(B, T)`` of
  ``token_sequences(corpus, ..., batch_size=B)``, sequence by sequence, positions ``1..T-1`` (BOS not served),
  i.e. ``trace_sites(model, ids, ...)[:, 1:].reshape(-1, n_layers, d_model)``. Rows pass through a shuffling pool
  of ``shuffle_rows`` rows (``RowMixer``: each new row takes the place of a random row of the pool, which goes to
  the ring), so that a batch mixes rows of many sequences; ``shuffle_rows=0`` serves the harvest order. Batches
  are consecutive runs of the ring's rows; batch ``k`` is the k-th batch taken. The served order depends only on
  the corpus, the model and ``seed``. No batch is served, and no normalization reported, before the pool has
  filled: the statistics are those of every row harvested until then (at least ``shuffle_rows``), and stay
  fixed, so every client normalizes alike. Nothing touches the disc.

Both are ``protocol.Source``s: the server needs nothing else of a source, so any class with those members serves.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..buffer import DiscBuffer
from ..sites import NormAccumulator, NormStats, to_storage, trace_sites
from ..store import STORAGE_DTYPES
from .protocol import FileRange, NoData, RangedBatch, SourceError, SourceInfo, WireBatch

log = logging.getLogger("cltlab")


class DiscSource:
    """Serves a harvest folder; see the module docstring for which batch an index is.

    One DiscBuffer per batch size is kept open (at most ``max_buffers`` of them unless more are being read at
    once); one is closed only when no request is reading from it.
    """

    def __init__(self, path: str | Path, *, seed: int = 0, max_buffers: int = 8):
        self.path, self.seed, self.max_buffers = Path(path), seed, max_buffers
        probe = DiscBuffer(self.path, batch_size=1)
        self.info = SourceInfo(
            "disc",
            probe.summary(),
            probe.n_layers,
            probe.d_model,
            probe.layer_start,
            probe.dtype,
            probe.n_tokens,
            probe.origin,
        )
        self._stats = probe.stats
        probe.close()
        self._buffers: collections.OrderedDict[int, DiscBuffer] = collections.OrderedDict()
        self._users: collections.Counter[int] = collections.Counter()  # requests reading each buffer now
        self._cursors: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    alive = True
    error = None

    def check(self, batch_size: int, index: int | None = None) -> None:
        if not 1 <= batch_size <= self.info.n_tokens:
            raise SourceError(
                f"batch_size must be between 1 and the {self.info.n_tokens} rows of the buffer, not {batch_size}."
            )
        if index is not None and index < 0:
            raise SourceError(f"index must be >= 0, not {index}.")

    @contextlib.contextmanager
    def buffer(self, batch_size: int) -> Iterator[DiscBuffer]:
        """The DiscBuffer behind batches of ``batch_size``, not closed while the ``with`` block reads it."""
        self.check(batch_size)
        with self._lock:
            if batch_size not in self._buffers:
                self._buffers[batch_size] = DiscBuffer(
                    self.path, batch_size=batch_size, seed=self.seed
                ).open()
            self._buffers.move_to_end(batch_size)
            self._users[batch_size] += 1
            buffer = self._buffers[batch_size]
        try:
            yield buffer
        finally:
            with self._lock:
                self._users[batch_size] -= 1
                self._evict()

    def _evict(self) -> None:
        """Close the least recently used buffers nobody reads while more than ``max_buffers`` are open."""
        idle = [size for size in self._buffers if not self._users[size]]
        for size in idle[: max(0, len(self._buffers) - self.max_buffers)]:
            self._buffers.pop(size).close()
            del self._users[size]

    def take(self, batch_size: int, index: int | None = None, out: np.ndarray | None = None) -> WireBatch:
        """Batch ``index`` (the cursor's next one when None), read straight into ``out`` when it is large enough."""
        self.check(batch_size, index)
        with self.buffer(batch_size) as buffer:
            index = self._next(batch_size, index)
            rows = buffer.batch_rows(index % len(buffer))
            site_bytes = rows * self.info.row_bytes
            data = (
                out[: 2 * site_bytes]
                if out is not None and out.nbytes >= 2 * site_bytes
                else np.empty(2 * site_bytes, np.uint8)
            )
            buffer.read_batch_into(index % len(buffer), (data[:site_bytes], data[site_bytes:]))
        return WireBatch(index, rows, data)

    @contextlib.contextmanager
    def ranges(self, batch_size: int, index: int | None = None) -> Iterator[RangedBatch]:
        """``take`` without reading: the batch as byte ranges of its shard files, open inside the ``with`` block
        (the stream sends them with ``sendfile``, so the bytes never pass through this process)."""
        self.check(batch_size, index)
        with self.buffer(batch_size) as buffer:
            index = self._next(batch_size, index)
            position = index % len(buffer)
            with buffer.batch_ranges(position) as ranges:
                yield RangedBatch(index, buffer.batch_rows(position), [FileRange(*r) for r in ranges])

    def _next(self, batch_size: int, index: int | None) -> int:
        """``index``, or the next index of the shared cursor of ``batch_size`` when None."""
        if index is not None:
            return index
        with self._lock:
            self._cursors[batch_size] += 1
            return self._cursors[batch_size] - 1

    @property
    def stats(self) -> NormStats:
        """Normalization statistics of the whole buffer."""
        return self._stats

    def fill(self) -> float:
        """Fraction of the source ready to serve (a DiscBuffer is always full)."""
        return 1.0

    def close(self) -> None:
        with self._lock:
            for buffer in self._buffers.values():
                buffer.close()
            self._buffers.clear()
            self._users.clear()


class LiveSource:
    """A model harvested on demand into a bounded in-memory ring; see the module docstring for the row order."""

    def __init__(
        self,
        model,
        *,
        corpus: str = "shakespeare",
        seq_len: int = 128,
        batch_size: int = 16,
        layers: tuple[int, int] | None = None,
        dtype: str = "float32",
        split: str = "train",
        capacity: int = 16384,
        shuffle_rows: int = 65536,
        seed: int = 0,
        repeat: bool = True,
    ):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, not {dtype!r}.")
        if capacity < 1 or shuffle_rows < 0:
            raise ValueError(
                f"capacity must be positive and shuffle_rows non-negative, not {capacity} and {shuffle_rows}."
            )
        self.model, self.corpus, self.seq_len, self.forward_batch = model, corpus, seq_len, batch_size
        self.layer_start, self.layer_stop = layers or (0, model.n_layers)
        self.split, self.capacity, self.repeat = split, capacity, repeat
        self.info = SourceInfo(
            "live",
            f"live {model.name} on {corpus}/{split}, seq_len {seq_len}, layers {self.layer_start}–{self.layer_stop - 1}",
            self.layer_stop - self.layer_start, model.d_model, self.layer_start, dtype, None,
            {"model": model.name, "corpus": corpus, "seq_len": seq_len},
        )  # fmt: skip
        self._chunks: collections.deque[np.ndarray] = (
            collections.deque()
        )  # each (2, rows, n_layers * d_model)
        self._offset = 0  # rows of the first chunk already taken
        self._rows = 0  # rows ready
        self._taken = 0  # batches taken
        self._norms = NormAccumulator(
            self.info.n_layers, self.info.d_model
        )  # of the rows before the first batch
        self._stats: NormStats | None = None  # fixed when the first rows reach the ring
        self._mixer = RowMixer(shuffle_rows, seed)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._harvest, name="cltlab-live-harvester", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, model, config, **options) -> LiveSource:
        """A live source running ``model`` on what the HarvestConfig ``config`` names (corpus, seq_len, forward
        batch size, layers, dtype, split); ``options`` are further arguments (``shuffle_rows``, ``capacity``,
        ``seed`` ...)."""
        return cls(
            model, corpus=config.corpus, seq_len=config.seq_len, batch_size=config.batch_size,
            layers=config.layers, dtype=config.dtype, split=config.split, **options,
        )  # fmt: skip

    def _batches(self):
        from ..corpus import token_sequences

        while True:
            yield from token_sequences(
                self.corpus, self.model.tokenizer, seq_len=self.seq_len, bos_token_id=self.model.bos_token_id,
                split=self.split, batch_size=self.forward_batch,
            )  # fmt: skip
            if not self.repeat:
                return

    def _harvest(self) -> None:
        try:
            for ids in self._batches():
                acts = trace_sites(self.model, ids, self.layer_start, self.layer_stop)
                sites = [x[:, 1:].reshape(-1, self.info.n_layers, self.info.d_model).cpu() for x in acts[:2]]
                if self._stats is None:
                    for s, x in enumerate(sites):
                        self._norms.add(s, x)
                chunk = np.stack([to_storage(x, self.info.dtype).numpy() for x in sites])
                if not self._put(self._mixer.add(chunk.reshape(2, chunk.shape[1], -1))):
                    return
            self._put(self._mixer.drain())  # the corpus ended (repeat=False): the pool's rows, shuffled
        except BaseException as err:  # noqa: BLE001 - surfaced by take() and the server handle
            log.error("The live harvester stopped: %s", err)
            self.error = err
            with self._cond:
                self._cond.notify_all()

    def _put(self, rows: np.ndarray) -> bool:
        """Append ``rows`` ``(2, n, row)`` to the ring once it has room; False when the source is closing."""
        if rows.shape[1] == 0:
            return not self._stop.is_set()
        with self._cond:
            while self._rows >= self.capacity and not self._stop.is_set():
                self._cond.wait(0.1)
            if self._stop.is_set():
                return False
            if self._stats is None:
                self._stats = self._norms.stats()
            self._chunks.append(rows)
            self._rows += rows.shape[1]
            self._cond.notify_all()
        return True

    @property
    def alive(self) -> bool:
        """False once the harvester has stopped (the corpus ended, an error, or ``close()``)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def check(self, batch_size: int, index: int | None = None) -> None:
        if index is not None:
            raise SourceError(
                "index is not available in live mode: each live batch is served once, in order."
            )
        if not 1 <= batch_size <= self.capacity:
            raise SourceError(
                f"batch_size must be between 1 and the ring's capacity {self.capacity}, not {batch_size}."
            )

    def take(
        self, batch_size: int, index: int | None = None, out: np.ndarray | None = None, timeout: float = 30.0
    ) -> WireBatch:
        """The next ``batch_size`` rows (waits up to ``timeout`` seconds for the harvester)."""
        self.check(batch_size, index)
        row_bytes = self.info.row_bytes
        size = 2 * batch_size * row_bytes
        data = out[:size] if out is not None and out.nbytes >= size else np.empty(size, np.uint8)
        sites = data.view(np.dtype(STORAGE_DTYPES[self.info.dtype])).reshape(2, batch_size, -1)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._rows < batch_size:
                if self.error is not None:
                    raise NoData(f"The live harvester failed: {self.error}") from self.error
                if not self.alive:
                    raise NoData("The live harvester has stopped (the corpus ended); no more batches.")
                if (
                    not self._cond.wait(max(0.0, deadline - time.monotonic()))
                    and time.monotonic() >= deadline
                ):
                    raise NoData(f"No live batch of {batch_size} rows was ready within {timeout:.0f} s.")
            at = 0
            while at < batch_size:
                chunk = self._chunks[0]
                take = min(batch_size - at, chunk.shape[1] - self._offset)
                sites[:, at : at + take] = chunk[:, self._offset : self._offset + take]
                at, self._offset = at + take, self._offset + take
                if self._offset == chunk.shape[1]:
                    self._chunks.popleft()
                    self._offset = 0
            self._rows -= batch_size
            index, self._taken = self._taken, self._taken + 1
            self._cond.notify_all()
        return WireBatch(index, batch_size, data)

    @property
    def stats(self) -> NormStats | None:
        """Normalization statistics of the rows harvested before the first batch was ready (None until then)."""
        return self._stats

    def wait_ready(self, timeout: float = 600.0) -> NormStats:
        """Wait until the first batch is ready (the shuffling pool has filled); return the normalization."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._stats is None:
                if self.error is not None:
                    raise NoData(f"The live harvester failed: {self.error}") from self.error
                if not self.alive:
                    raise NoData("The live harvester stopped before its first batch.")
                if time.monotonic() >= deadline:
                    raise NoData(f"The live harvester filled no pool of rows within {timeout:.0f} s.")
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        return self._stats

    def fill(self) -> float:
        """Fraction of the ring's capacity holding rows ready to serve."""
        return min(1.0, self._rows / self.capacity)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)


class RowMixer:
    """A shuffling pool of ``size`` rows: rows come in in harvest order and go out in a random order, each once.

    Until the pool is full, rows only come in; then each new row takes the slot of a uniformly random pooled row,
    which goes out. ``drain`` empties the pool in a random order. Seeded: the same rows in give the same rows out.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)
        self.pool: np.ndarray | None = None  # (2, size, row), allocated at the first rows
        self.n = 0  # rows pooled

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Pool ``rows`` ``(2, n, row)``; return the rows that leave ``(2, m, row)`` (none until the pool fills)."""
        if self.size == 0:
            return rows
        if self.pool is None:
            self.pool = np.empty((2, self.size, rows.shape[2]), rows.dtype)
        fill = min(self.size - self.n, rows.shape[1])
        self.pool[:, self.n : self.n + fill] = rows[:, :fill]
        self.n += fill
        out = []
        for at in range(fill, rows.shape[1], self.size):  # at most a pool's worth at a time
            new = rows[:, at : at + self.size]
            slots = self.rng.choice(self.size, new.shape[1], replace=False)
            out.append(self.pool[:, slots])  # a copy: fancy indexing
            self.pool[:, slots] = new
        return np.concatenate(out, axis=1) if out else rows[:, :0]

    def drain(self) -> np.ndarray:
        """Every pooled row, in a random order; the pool is empty afterwards."""
        if self.pool is None:
            return np.empty((2, 0, 0), np.uint8)
        out = self.pool[:, self.rng.permutation(self.n)]
        self.n = 0
        return out
