"""A shared-memory ring of batch slots, for clients on the server's host: HTTP carries only the slot numbers.

One ``multiprocessing.shared_memory`` segment holds ``n_slots`` slots of one batch each. A producer thread reads
the source's next batches straight into free slots ahead of demand (the only copy a batch sees on this path);
``lease`` hands a filled slot to a client and ``release`` gives it back.

A lease is either *kept* or *copied*. A kept lease lets the client use the slot in place, with no copy: its
tensors view the shared memory until the client releases the slot, which it does when the batch is garbage
collected. At most ``n_slots - 1`` slots are kept at once, so one slot always cycles through the producer: every
other lease (and every lease by a client that does not say its process id) is copied, i.e. the client copies
the batch out and releases the slot at once. Thus clients that hold many batches (``list(stream)``, DataLoader
prefetch, eight clients on four slots) get copies instead of a deadlock. A kept lease is reclaimed when its
client process has exited; a copied one when it is not released within ``lease_s`` seconds.

The segment is unlinked by ``close()``; the server handle closes its rings on ``stop()`` and at interpreter
exit. Clients map segments with ``attach`` (Linux: ``/dev/shm``); a mapping lives as long as an array views it.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import threading
import time
import uuid
from multiprocessing import shared_memory
from typing import NamedTuple

import numpy as np

from .sources import NoData

log = logging.getLogger("cltlab")

FREE, FILLING, READY, LEASED = "free", "filling", "ready", "leased"


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
    keep: bool
    """True: use the slot in place and release it when done; False: copy the batch out and release it at once."""


class ShmRing:
    """Slots of ``batch_size`` rows in one shared-memory segment, kept filled from ``source`` by a daemon thread."""

    def __init__(self, source, batch_size: int, *, n_slots: int = 4, lease_s: float = 60.0):
        self.source, self.batch_size, self.n_slots, self.lease_s = source, batch_size, n_slots, lease_s
        # A DiscBuffer batch never exceeds batch_size rows.
        self.slot_bytes = 2 * batch_size * source.info.row_bytes
        self.segment = shared_memory.SharedMemory(
            create=True, size=n_slots * self.slot_bytes, name=f"cltlab-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        self.name = self.segment.name
        self._array = np.ndarray((n_slots, self.slot_bytes), np.uint8, buffer=self.segment.buf)
        self._state = [FREE] * n_slots
        self._meta: list[tuple[int, int]] = [(0, 0)] * n_slots  # (index, rows) of each filled slot
        self._holder: list[int | None] = [None] * n_slots  # process id of a kept lease's client
        self._deadline = [0.0] * n_slots  # when a copied lease is reclaimed
        self._ready: collections.deque[int] = collections.deque()  # filled slots in batch order
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="cltlab-shm-producer", daemon=True)
        self._thread.start()

    @property
    def kept(self) -> int:
        """Slots leased in place right now."""
        return sum(holder is not None for holder in self._holder)

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
                    self._state[slot] = FILLING
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
            if state != LEASED:
                continue
            holder = self._holder[slot]
            if holder is None and now > self._deadline[slot]:
                log.warning("Reclaiming shared-memory slot %d: its copied lease expired unreleased.", slot)
            elif holder is not None and not _alive(holder):
                log.warning("Reclaiming shared-memory slot %d: its process %d has exited.", slot, holder)
            else:
                continue
            self._state[slot], self._holder[slot] = FREE, None

    def lease(self, timeout: float = 30.0, *, pid: int | None = None) -> Lease:
        """The next filled slot, leased to the caller (waits up to ``timeout`` seconds).

        ``pid``: the client's process id; only a client that gives it may keep a slot (see the module docstring).
        """
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
            keep = pid is not None and self.kept < self.n_slots - 1
            self._state[slot], self._holder[slot] = LEASED, pid if keep else None
            self._deadline[slot] = time.monotonic() + self.lease_s
            index, rows = self._meta[slot]
        nbytes = 2 * rows * self.source.info.row_bytes
        return Lease(self.name, slot, slot * self.slot_bytes, nbytes, index, rows, keep)

    def release(self, slot: int) -> bool:
        """Give a leased slot back; False when it was not leased (already released or reclaimed)."""
        with self._cond:
            if not 0 <= slot < len(self._state) or self._state[slot] != LEASED:
                return False
            self._state[slot], self._holder[slot] = FREE, None
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """Stop the producer and unlink the segment (clients keep their mappings while their arrays live)."""
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


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write. Unmapped when the last array viewing it is gone; never unlinks it."""
    if not name.startswith("cltlab-") or "/" in name:
        raise ValueError(f"{name!r} is not an activation server's shared-memory segment.")
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)
