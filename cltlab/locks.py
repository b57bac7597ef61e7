"""Who may write a harvest folder: flock-based locks, dropped by the OS when their holder dies.

    .lock                    the folder's short lock, held for a moment (merging the manifest, taking a job's lock)
    .harvest-0-of-1.lock     job 0 of 1's lock on its shards, held for the harvest's lifetime; names its holder

A killed harvest leaves no stale lock: the OS lets go of an ``flock`` with its process, and the next job to take
the folder's lock removes a job lock nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"


@contextlib.contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """Hold the folder's short lock (merging the manifest, taking a job's lock), waiting until it is free."""
    path = directory / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed this file as it let go: lock the new one
    try:
        yield
    finally:
        os.unlink(
            path
        )  # while held, so the folder is left as it was; a waiter sees the file gone and retries
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class HarvestBusy(RuntimeError):
    """Another live harvest holds shards this one would write."""


class HarvestLock:
    """Job ``i`` of ``n``'s exclusive lock on its shards of a harvest folder, held from ``acquire`` to ``release``.

    The lock is an ``flock`` on ``.harvest-<i>-of-<n>.lock`` naming its holder (the OS drops it when the process
    dies, so a killed harvest leaves no stale lock). Taking it fails while a live harvest holds a job whose shards
    overlap (any other ``n`` may overlap); jobs with disjoint shards run side by side. Lock files are created and
    removed only under the folder's short lock.
    """

    def __init__(self, directory: Path, job: tuple[int, int], n_shards: int):
        self.directory, self.job, self.n_shards = Path(directory), job, n_shards
        self.path = self.directory / f".harvest-{job[0]}-of-{job[1]}.lock"
        self._fd: int | None = None

    def _overlaps(self, other: tuple[int, int]) -> bool:
        i, n = self.job
        return any(shard % other[1] == other[0] for shard in range(i, self.n_shards, n))

    def acquire(self) -> HarvestLock:
        with folder_lock(self.directory):
            for path in sorted(self.directory.glob(".harvest-*-of-*.lock")):
                other = tuple(int(v) for v in path.name[len(".harvest-") : -len(".lock")].split("-of-"))
                fd = os.open(path, os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if self._overlaps(other):
                        holder = os.pread(fd, 4096, 0).decode(errors="replace")
                        raise HarvestBusy(_busy_message(self.directory, self.job, other, holder)) from None
                    continue
                else:
                    path.unlink()  # left by a harvest that was killed; we hold it, nobody else can
                finally:
                    os.close(fd)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "job": list(self.job)}  # fmt: skip
            os.write(fd, json.dumps(holder).encode())
            self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with folder_lock(self.directory):
            self.path.unlink()
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> HarvestLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _busy_message(directory: Path, job: tuple[int, int], other: tuple[int, int], holder: str) -> str:
    try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on {h['host']} (started {h['started']})"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return (
        f"{directory} is being harvested by {who} as job {other[0]}/{other[1]}, which writes shards of job "
        f"{job[0]}/{job[1]} too; wait for it to finish (or stop it) and run this harvest again. Nothing was changed."
    )
