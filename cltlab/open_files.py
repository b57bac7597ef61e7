"""The shard files a DiscBuffer holds open: opened on first use, at most ``max_open`` of each kind at once.

A folder of thousands of shards would otherwise exhaust the process's file descriptors. The least recently used
file is closed first, and one being read is never closed under its reader (threads may read batches at once).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import h5py

from .store import open_shard, too_many_open_files

H = TypeVar("H")


class HandleCache(Generic[H]):
    """At most ``max_open`` open handles by shard (least recently used closed first), opened on first use.

    Thread-safe; a handle in use is never closed under its user (while every open handle is in use, more than
    ``max_open`` may be open for a moment).
    """

    def __init__(self, open_: Callable[[int], H], close: Callable[[H], None], max_open: int):
        self._open, self._close, self.max_open = open_, close, max_open
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[int, list] = (
            collections.OrderedDict()
        )  # shard → [handle, users]
        self._retired: dict[int, list] = {}  # id → entry closed by close() while in use

    @contextlib.contextmanager
    def use(self, shard: int) -> Iterator[H]:
        with self._lock:
            entry = self._entries.get(shard)
            if entry is None:
                self._evict(room=1)
                entry = self._entries[shard] = [self._open(shard), 0]
            self._entries.move_to_end(shard)
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._retired.pop(id(entry), None) is not None:
                    self._close(entry[0])
                self._evict(room=0)

    def _evict(self, room: int) -> None:
        for shard in list(self._entries):
            if len(self._entries) + room <= self.max_open:
                return
            if self._entries[shard][1] == 0:
                self._close(self._entries.pop(shard)[0])

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                if entry[1]:
                    self._retired[id(entry)] = entry
                else:
                    self._close(entry[0])
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries) + len(self._retired)


class OpenFiles(NamedTuple):
    """A DiscBuffer's open shard files, by kind."""

    fds: HandleCache[int]
    """OS file descriptors of shards, for the batch reads."""
    files: HandleCache[h5py.File]
    """HDF5 handles of shards, for tokens, contexts and statistics."""

    @classmethod
    def lazily(cls, path_of: Callable[[int], Path], max_open: int) -> OpenFiles:
        """Caches that open shard ``i`` (the file ``path_of(i)``) when it is first used."""
        return cls(
            HandleCache(lambda shard: open_fd(path_of(shard)), os.close, max_open),
            HandleCache(lambda shard: open_shard(path_of(shard)), h5py.File.close, max_open),
        )

    def close(self) -> None:
        """Close every open file (one in use is closed as soon as its user is done)."""
        self.fds.close()
        self.files.close()


def open_fd(path: Path) -> int:
    """A read-only descriptor of ``path``; running out of descriptors is reported as that, not as a bad file."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in (errno.EMFILE, errno.ENFILE):
            raise too_many_open_files(path) from None
        raise
