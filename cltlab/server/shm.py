"""A shared-memory ring of batch slots, for clients on the server's host: HTTP carries only the slot numbers.

One ``multiprocessing.shared_memory`` segment holds ``n_slots`` slots of one batch each. A producer thread reads
the source's next batches straight into free slots ahead of demand; ``lease`` hands a filled slot to a client
(which copies it out of the segment) and ``release`` gives it back. A lease not released within ``lease_s``
seconds (a client that died) is reclaimed. The segment is unlinked by ``close()``; the server handle closes its
rings on ``stop()`` and at interpreter exit.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from multiprocessing import resource_tracker, shared_memory
from typing import NamedTuple

import numpy as np

from .sources import NoData

log = logging.getLogger("cltlab")

FREE, READY, LEASED = "free", "ready", "leased"
_CREATED: set[str] = set()  # segments created by this process (its resource tracker must keep them)


class Lease(NamedTuple):
    """Where a leased batch lies in shared memory."""

    segment: str
    """Name of the shared-memory segment."""
    slot: int
    """Slot number (give it back with ``release``)."""
    offset: int
    """Byte offset of the batch in the segment."""
    nbytes: int
    """Bytes of the batch: resid_mid then mlp_out."""
    index: int
    """The batch's index in the source's sequence."""
    rows: int
    """Rows in the batch."""


class ShmRing:
    """Slots of ``batch_size`` rows in one shared-memory segment, kept filled from ``source`` by a daemon thread."""

    def __init__(self, source, batch_size: int, *, n_slots: int = 4, lease_s: float = 60.0):
        self.source, self.batch_size, self.lease_s = source, batch_size, lease_s
        self.slot_bytes = (
            2 * batch_size * source.info.row_bytes
        )  # a DiscBuffer batch never exceeds batch_size rows
        self.segment = shared_memory.SharedMemory(
            create=True, size=n_slots * self.slot_bytes, name=f"cltlab-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        self.name = self.segment.name
        _CREATED.add(self.name)
        self._array = np.ndarray((n_slots, self.slot_bytes), np.uint8, buffer=self.segment.buf)
        self._state = [FREE] * n_slots
        self._meta: list[tuple[int, int]] = [(0, 0)] * n_slots  # (index, rows) of each filled slot
        self._deadline = [0.0] * n_slots
        self._ready: collections.deque[int] = collections.deque()  # filled slots in batch order
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="cltlab-shm-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    self._reclaim()
                    free = [s for s, state in enumerate(self._state) if state == FREE]
                    if not free:
                        self._cond.wait(0.1)
                        continue
                    slot = free[0]
                    self._state[slot] = "filling"
                try:
                    batch = self.source.take(self.batch_size, out=self._array[slot])
                except NoData:
                    with self._cond:
                        self._state[slot] = FREE
                    if not getattr(self.source, "_thread", None) or self.source._thread.is_alive():
                        continue  # live mode warming up: try again
                    raise
                with self._cond:
                    self._meta[slot] = (batch.index, batch.rows)
                    self._state[slot] = READY
                    self._ready.append(slot)
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - surfaced by lease()
            log.error("The shared-memory producer stopped: %s", err)
            self.error = err
            with self._cond:
                self._cond.notify_all()

    def _reclaim(self) -> None:
        now = time.monotonic()
        for slot, state in enumerate(self._state):
            if state == LEASED and now > self._deadline[slot]:
                log.warning("Reclaiming shared-memory slot %d: its lease expired unreleased.", slot)
                self._state[slot] = FREE

    def lease(self, timeout: float = 30.0) -> Lease:
        """The next filled slot, leased to the caller (waits up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                if self.error is not None:
                    raise RuntimeError(f"The shared-memory producer failed: {self.error}") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    raise NoData(f"No batch was ready in shared memory within {timeout:.0f} s.")
                self._cond.wait(remaining)
            slot = self._ready.popleft()
            self._state[slot] = LEASED
            self._deadline[slot] = time.monotonic() + self.lease_s
            index, rows = self._meta[slot]
        return Lease(
            self.name, slot, slot * self.slot_bytes, 2 * rows * self.source.info.row_bytes, index, rows
        )

    def release(self, slot: int) -> bool:
        """Give a leased slot back; False when it was not leased (already released or reclaimed)."""
        with self._cond:
            if not 0 <= slot < len(self._state) or self._state[slot] != LEASED:
                return False
            self._state[slot] = FREE
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Stop the producer and unlink the segment (clients still attached keep their mapping until they close)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)
        del self._array
        self.segment.close()
        try:
            self.segment.unlink()
        except FileNotFoundError:
            pass


def attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's resource tracker unlink it at exit."""
    segment = shared_memory.SharedMemory(name=name)
    if name not in _CREATED:  # the server owns it (Python < 3.13 also tracks segments it only attaches to)
        resource_tracker.unregister(segment._name, "shared_memory")
    return segment
