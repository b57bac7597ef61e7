"""What the app's routes share: the source, the budgets, the shared-memory rings, counters and errors.

Every budget is checked before anything is allocated. A request beyond a size budget is answered 413
(``TooLarge``), one beyond a concurrency budget 429 (``TooBusy``): the bytes of batches being read or sent at once,
the number of streams, and the number of rings. Rings are made on demand, one per batch size; the least recently
used ring that holds no lease makes room for a new one, and a ring nobody used for ``ring_idle_s`` seconds is freed.
"""

from __future__ import annotations

import collections
import threading
import time

from .protocol import Limits, Source, Stats
from .shm import ShmFull, ShmRing


class TooLarge(ValueError):
    """A request beyond a size budget; answered 413."""


class TooBusy(RuntimeError):
    """A request beyond a concurrency budget; answered 429."""


class Reservation:
    """Bytes (and maybe a stream) counted against the budgets until ``release()`` (idempotent)."""

    def __init__(self, state: ServerState, nbytes: int, stream: bool):
        self.state, self.nbytes, self.stream, self.released = state, nbytes, stream, False

    def release(self) -> None:
        with self.state.lock:
            if not self.released:
                self.released = True
                self.state.inflight_bytes -= self.nbytes
                self.state.streams -= self.stream


class ServerState:
    """The source, its limits, the rings, counters and the latest errors."""

    def __init__(
        self,
        source: Source,
        limits: Limits,
        *,
        token: str | None = None,
        shared_memory: bool = True,
        allowed_hosts: set[str] | None = None,
        n_slots: int = 4,
        ring_idle_s: float = 60.0,
    ):
        self.source, self.limits, self.token, self.shared_memory = source, limits, token, shared_memory
        self.allowed_hosts, self.n_slots, self.ring_idle_s = allowed_hosts, n_slots, ring_idle_s
        self.started = time.monotonic()
        self.batches = self.bytes = self.inflight_bytes = self.streams = 0
        self.errors: collections.deque[BaseException] = collections.deque(maxlen=limits.max_errors)
        self.rings: collections.OrderedDict[int, ShmRing] = (
            collections.OrderedDict()
        )  # least recently used first
        self.lock = threading.Lock()

    def count(self, nbytes: int) -> None:
        with self.lock:
            self.batches += 1
            self.bytes += nbytes

    def check_reply(self, batch_size: int, index: int | None = None) -> int:
        """The bytes of a batch of ``batch_size`` rows, once the source and the reply budget allow it."""
        self.source.check(batch_size, index)
        nbytes = self.source.info.batch_bytes(batch_size)
        if batch_size > self.limits.max_batch_size or nbytes > self.limits.max_reply_bytes:
            raise TooLarge(
                f"batch_size {batch_size} is {nbytes} bytes, over this server's limit of "
                f"{self.limits.max_batch_size} rows and {self.limits.max_reply_bytes} bytes; ask for fewer rows."
            )
        return nbytes

    def reserve(self, nbytes: int, *, stream: bool = False) -> Reservation:
        """Count ``nbytes`` (and a stream) against the budgets, or raise TooBusy."""
        with self.lock:
            if stream and self.streams >= self.limits.max_streams:
                raise TooBusy(
                    f"This server already sends {self.streams} streams, its limit; try again when one ends."
                )
            if self.inflight_bytes + nbytes > self.limits.max_inflight_bytes:
                raise TooBusy(
                    f"This server is reading or sending {self.inflight_bytes} bytes of batches; {nbytes} more "
                    f"would pass its limit of {self.limits.max_inflight_bytes}. Try again shortly."
                )
            self.inflight_bytes += nbytes
            self.streams += stream
        return Reservation(self, nbytes, stream)

    def ring(self, batch_size: int) -> ShmRing:
        """The ring of ``batch_size``, made now if there is none (freeing idle rings to stay in the budgets)."""
        self.source.check(batch_size)
        nbytes = self.n_slots * self.source.info.batch_bytes(batch_size)
        with self.lock:
            now = time.monotonic()
            for size, ring in list(self.rings.items()):
                if size != batch_size and not ring.leased and now - ring.last_used > self.ring_idle_s:
                    self.rings.pop(size).close()
            if batch_size in self.rings:
                self.rings.move_to_end(batch_size)
                return self.rings[batch_size]
            if nbytes > self.limits.max_shm_bytes:
                raise ShmFull(
                    f"A shared-memory ring of batch_size {batch_size} needs {nbytes} bytes, over this server's "
                    f"limit of {self.limits.max_shm_bytes}; stream over HTTP or ask for fewer rows."
                )
            while (
                len(self.rings) >= self.limits.max_rings
                or sum(r.nbytes for r in self.rings.values()) + nbytes > self.limits.max_shm_bytes
            ):
                idle = [size for size, ring in self.rings.items() if not ring.leased]
                if not idle:
                    raise TooBusy(
                        f"Every shared-memory ring ({len(self.rings)}) holds leases; release them or stream "
                        "over HTTP."
                    )
                self.rings.pop(idle[0]).close()
            ring = self.rings[batch_size] = ShmRing(
                self.source, batch_size, n_slots=self.n_slots, lease_s=self.limits.lease_s
            )
            return ring

    def rings_now(self) -> list[ShmRing]:
        with self.lock:
            return list(self.rings.values())

    def stats(self) -> Stats:
        seconds = time.monotonic() - self.started
        return Stats(
            batches=self.batches,
            bytes=self.bytes,
            seconds=seconds,
            gb_per_s=self.bytes / seconds / 1e9 if seconds else 0.0,
            fill=self.source.fill(),
            shm_rings=sorted(self.rings),
            inflight_bytes=self.inflight_bytes,
            streams=self.streams,
            errors=[f"{type(e).__name__}: {e}" for e in list(self.errors)],
        )

    def close(self) -> None:
        with self.lock:
            for ring in self.rings.values():
                ring.close()
            self.rings.clear()
