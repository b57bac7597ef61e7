"""A shared-memory ring of batch slots, for clients on the server's host: HTTP carries only the lease.

One segment in ``/dev/shm`` holds ``n_slots`` slots of one batch each. Its pages are reserved when it is made
(``posix_fallocate``): a tmpfs that is too small (containers default to 64 MiB) fails then, as ``ShmFull``, and
never later as a SIGBUS in whoever touches the missing page. A producer thread reads the source's next batches
straight into free slots ahead of demand (the only copy a batch sees on this path); ``lease`` hands a filled slot
to a client under an unguessable id, and ``release`` with that id gives it back.

A lease is either *kept* or *copied*. A kept lease lets the client use the slot in place, with no copy, until it
releases it (when the batch is garbage collected); the client renews it while it holds it. At most
``n_slots - 1`` slots are kept at once, so one slot always cycles through the producer: every other lease is
copied, i.e. the client copies the batch out and releases the slot at once. Thus clients that hold many batches
(``list(stream)``, DataLoader prefetch, eight clients on four slots) get copies instead of a deadlock. Nothing a
client says about itself is trusted: every lease, kept or copied, is reclaimed when it has been neither renewed
nor released for ``lease_s`` seconds, and only the id's holder can release or renew it.

The segment is unlinked by ``close()``; the server closes its rings on ``stop()`` and at interpreter exit, and
frees rings that nobody used for a while. Clients map segments with ``attach``; a mapping lives as long as an
array views it.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import secrets
import threading
import time
import uuid
from typing import NamedTuple

import numpy as np

from .protocol import NoData, Source

log = logging.getLogger("cltlab")

FREE, FILLING, READY, LEASED = "free", "filling", "ready", "leased"
SHM_DIR = "/dev/shm"


class ShmFull(RuntimeError):
    """The shared memory a ring needs is not there (tmpfs full or a budget spent); clients fall back to HTTP."""


class RingBusy(RuntimeError):
    """Every slot of the ring is leased; the client should try again shortly."""


class Lease(NamedTuple):
    """Where a leased batch lies in shared memory."""

    lease: str
    """The lease's id (only its holder knows it)."""
    segment: str
    """Name of the shared-memory segment."""
    slot: int
    """Slot number."""
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
    expires_s: float
    """Seconds until the slot is reclaimed unless renewed or released."""


class Segment:
    """A named shared-memory segment of ``size`` bytes whose pages are all reserved now (Linux ``/dev/shm``)."""

    def __init__(self, size: int):
        self.name, self.size = f"cltlab-{os.getpid()}-{uuid.uuid4().hex[:12]}", size
        if not (os.path.isdir(SHM_DIR) and hasattr(os, "posix_fallocate")):
            raise ShmFull(f"Shared memory needs {SHM_DIR} and posix_fallocate (Linux); stream over HTTP.")
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        except OSError as err:
            self.unlink()
            if err.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ShmFull(
                    f"{SHM_DIR} has no room for {size / 2**20:.0f} MiB of shared memory; stream over HTTP, or "
                    f"give the container more (e.g. docker run --shm-size=2g)."
                ) from err
            raise
        finally:
            os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


class ShmRing:
    """Slots of ``batch_size`` rows in one shared-memory segment, kept filled from ``source`` by a daemon thread."""

    def __init__(self, source: Source, batch_size: int, *, n_slots: int = 4, lease_s: float = 30.0):
        self.source, self.batch_size, self.n_slots, self.lease_s = source, batch_size, n_slots, lease_s
        # A DiscBuffer batch never exceeds batch_size rows.
        self.slot_bytes = source.info.batch_bytes(batch_size)
        self.nbytes = n_slots * self.slot_bytes
        self.segment = Segment(self.nbytes)
        self.name = self.segment.name
        self._array = np.ndarray((n_slots, self.slot_bytes), np.uint8, buffer=self.segment.map)
        self._state = [FREE] * n_slots
        self._meta: list[tuple[int, int]] = [(0, 0)] * n_slots  # (index, rows) of each filled slot
        self._id: list[str | None] = [None] * n_slots  # the lease id of a leased slot
        self._kept = [False] * n_slots
        self._deadline = [0.0] * n_slots  # when a leased slot is reclaimed
        self._ready: collections.deque[int] = collections.deque()  # filled slots in batch order
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # the producer's latest error (cleared by its next batch)
        self.last_used = time.monotonic()
        self._thread = threading.Thread(target=self._produce, name="cltlab-shm-producer", daemon=True)
        self._thread.start()

    @property
    def kept(self) -> int:
        """Slots leased in place right now."""
        return sum(self._kept)

    @property
    def leased(self) -> int:
        """Slots leased (kept or copied) right now."""
        return self._state.count(LEASED)

    def _produce(self) -> None:
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
                if batch.data.ctypes.data != self._array[slot].ctypes.data:  # a source that ignored ``out``
                    self._array[slot, : batch.data.nbytes] = batch.data
            except Exception as err:  # noqa: BLE001 - answered by lease(); the ring keeps trying
                with self._cond:
                    self._state[slot] = FREE
                    if not isinstance(err, NoData) and self.error is None:
                        log.error("The shared-memory producer of batch size %d: %s", self.batch_size, err)
                    self.error = None if isinstance(err, NoData) and self.source.alive else err
                    self._cond.notify_all()
                self._stop.wait(0.05)
                continue
            with self._cond:
                self.error = None
                self._meta[slot] = (batch.index, batch.rows)
                self._state[slot] = READY
                self._ready.append(slot)
                self._cond.notify_all()

    def _reclaim(self) -> None:
        now = time.monotonic()
        for slot, state in enumerate(self._state):
            if state == LEASED and now > self._deadline[slot]:
                log.warning(
                    "Reclaiming shared-memory slot %d: its lease was neither renewed nor released.", slot
                )
                self._free(slot)

    def _free(self, slot: int) -> None:
        self._state[slot], self._id[slot], self._kept[slot] = FREE, None, False
        self._cond.notify_all()

    def lease(self, timeout: float = 5.0, *, keep: bool = False, busy_s: float = 1.0) -> Lease:
        """The next filled slot, leased to the caller (waits up to ``timeout`` seconds).

        ``keep``: the client would use the slot in place (granted while fewer than ``n_slots - 1`` are kept).
        Raises RingBusy when every slot stays leased for ``busy_s`` seconds, NoData when no batch came in time.
        """
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            self.last_used = time.monotonic()
            if self._stop.is_set():
                raise NoData(
                    f"The shared-memory ring of batch size {self.batch_size} was freed; lease again."
                )
            while not self._ready:
                self._reclaim()
                if self.error is not None:  # answered now: the producer keeps trying for the next lease
                    raise NoData(f"The shared-memory producer failed: {self.error}") from self.error
                remaining = deadline - time.monotonic()
                busy = self._state.count(LEASED) == self.n_slots
                if remaining <= 0 or self._stop.is_set() or (busy and time.monotonic() - start > busy_s):
                    if busy:
                        raise RingBusy(
                            f"All {self.n_slots} shared-memory slots of batch size {self.batch_size} are leased; "
                            "release some, or try again shortly."
                        )
                    raise NoData(f"No batch was ready in shared memory within {timeout:.0f} s.")
                self._cond.wait(min(remaining, 0.1))
            slot = self._ready.popleft()
            keep = keep and self.kept < self.n_slots - 1
            lease_id = secrets.token_urlsafe(24)
            self._state[slot], self._id[slot], self._kept[slot] = LEASED, lease_id, keep
            self._deadline[slot] = time.monotonic() + self.lease_s
            index, rows = self._meta[slot]
        nbytes = self.source.info.batch_bytes(rows)
        return Lease(
            lease_id, self.name, slot, slot * self.slot_bytes, nbytes, index, rows, keep, self.lease_s
        )

    def _slot_of(self, lease_id: str) -> int | None:
        if not lease_id.isascii():  # never one of ours (and compare_digest takes ASCII strings only)
            return None
        for slot, held in enumerate(self._id):
            if held is not None and secrets.compare_digest(held, lease_id):
                return slot
        return None

    def release(self, lease_id: str) -> bool:
        """Give a leased slot back; False when ``lease_id`` holds none (never leased, released or reclaimed)."""
        with self._cond:
            slot = self._slot_of(lease_id)
            if slot is None:
                return False
            self._free(slot)
            return True

    def renew(self, lease_id: str) -> bool:
        """Extend a lease by ``lease_s`` seconds from now; False when ``lease_id`` holds none."""
        with self._cond:
            slot = self._slot_of(lease_id)
            if slot is None:
                return False
            self._deadline[slot] = time.monotonic() + self.lease_s
            self.last_used = time.monotonic()
            return True

    def close(self) -> None:
        """Stop the producer and unlink the segment (clients keep their mappings while their arrays live)."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(timeout=10)
        del self._array
        try:
            self.segment.map.close()
        except BufferError:  # a batch being read into it still views it: unmapped once that is done
            pass
        self.segment.unlink()


def attach(name: str) -> mmap.mmap:
    """Map an existing segment read-write. Unmapped when the last array viewing it is gone; never unlinks it."""
    if not name.startswith("cltlab-") or "/" in name:
        raise ValueError(f"{name!r} is not an activation server's shared-memory segment.")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)
