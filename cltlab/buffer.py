"""DiscBuffer: a harvest folder (see ``store.py``) read back as shuffled training batches at block-read speed.

HDF5 reads whole contiguous blocks at page-cache speed and random row gathers at a hundredth of it, so nothing
here gathers rows. The activation datasets are contiguous, so a block is one byte range of its shard: batches
are read with one positional ``preadv`` per block and site straight into the batch array (h5py's per-call
overhead would otherwise cost about half the bandwidth). Rows were shuffled at harvest time within each forward batch (a sequence's tokens are
scattered over the blocks of its window); an epoch visits the blocks of every shard in a random order, and
each batch is a run of whole blocks read straight into one preallocated array.

Batches are items of a map-style Dataset (``DataLoader(buffer, batch_size=None, shuffle=True)``), so DataLoader
workers (each opens its own HDF5 handles), prefetching and samplers all apply. ``rank``/``world_size`` split the
batches between distributed ranks: disjoint parts of equal count that together cover every token once.

Files are opened when first read and at most ``max_open`` of each kind stay open (least recently used first out),
so a folder of thousands of shards does not exhaust the process's file descriptors; one being read is never
closed under its reader (threads may read batches at once). See ``open_files.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from .open_files import OpenFiles
from .sites import ActivationBatch, NormAccumulator, NormStats, row_bytes, to_torch
from .store import SITES, STORAGE_DTYPES, check_shard, open_shard, read_manifest, verify


class TokenContext(NamedTuple):
    """A window of token ids around one stored row."""

    ids: list[int]
    """Token ids of the window, in sequence order."""
    index: int
    """Position of the row's own token in ``ids``."""


class DiscBuffer(torch.utils.data.Dataset):
    """Shuffled batches of harvested activations.

    Attributes:
        path: the harvest folder.
        batch_size: rows per batch (batches differ by at most one row when the rows do not divide evenly).
        info: the manifest (provenance: model, corpus, sites, layers, tokenizer, dtype, format version, shards).
        n_tokens, n_layers, d_model, layer_start: shape of the stored activations.
        block_rows: rows per block read (about 1 MiB per site, dividing ``batch_size``).
        max_open: most shard files of each kind (descriptor, HDF5 handle) held open at once.

    ``verify=True`` recomputes every batch's checksum (reading the whole folder once) and raises naming each
    damaged shard and batch; ``cltlab verify FOLDER`` does the same from the shell.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 1024,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block_rows: int | None = None,
        max_open: int = 64,
        verify: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), not {rank}.")
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, not {max_open}.")
        self.path = Path(path)
        self.info = read_manifest(self.path)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.max_open = max_open
        self.n_tokens = int(self.info["n_written"])
        self.layer_start = int(self.info["layer_start"])
        self.n_layers = int(self.info["layer_stop"]) - self.layer_start
        self.d_model = int(self.info["d_model"])
        self.dtype = self.info["dtype"]
        if self.n_tokens < batch_size * world_size:
            raise ValueError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than one batch of {batch_size} per rank."
            )
        self._shard_rows = np.array([s["n_rows"] for s in self.info["shards"]])
        self._shard_start = np.concatenate(
            [[0], np.cumsum(self._shard_rows)]
        )  # global row of each shard's row 0
        self._row_bytes = row_bytes(self.n_layers, self.d_model, self.dtype)
        self.block_rows = block_rows or _block_rows(batch_size, self._row_bytes)
        self._batches = self._plan()
        # Find a damaged or foreign shard now, not in a worker later; one shard open at a time.
        self._offsets = [self._check(shard, entry) for shard, entry in enumerate(self.info["shards"])]
        if verify:
            self._verify()
        self._reset()

    def _check(self, shard: int, entry: dict) -> list[int]:
        """Check a shard against the manifest; return the byte offset of each site's contiguous dataset."""
        manifest = self.path / "manifest.json"
        with open_shard(self._shard_path(shard)) as f:
            check_shard(f, self.info, int(entry["n_rows"]), manifest)
            if int(f["progress"][0]) != entry["n_rows"] or int(f.attrs["n_rows"]) != entry["n_rows"]:
                raise ValueError(
                    f"{f.filename} holds {int(f['progress'][0])} rows but {manifest} lists "
                    f"{entry['n_rows']}: the harvest folder is inconsistent; harvest it again."
                )
            offsets = [f[site].id.get_offset() for site in SITES]
            if None in offsets:
                raise ValueError(f"{f.filename} stores its activations non-contiguously; harvest it again.")
        return offsets

    def _verify(self) -> None:
        problems = verify(self.path).problems
        if problems:
            listed = "\n  ".join(problems[:10]) + (
                f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            )
            raise ValueError(
                f"{self.path} failed verification ({len(problems)} damaged batches):\n  {listed}"
            )

    # ------------------------------------------------------------------------------------------ the plan

    def _plan(self) -> list[list[tuple[int, int, int]]]:
        """Every batch of this rank as a list of ``(shard, start, stop)`` row ranges."""
        blocks = [
            (shard, start, min(start + self.block_rows, int(rows)))
            for shard, rows in enumerate(self._shard_rows)
            for start in range(0, int(rows), self.block_rows)
        ]
        order = np.random.default_rng(self.seed).permutation(len(blocks))
        stream = [blocks[i] for i in order]
        # Cut the block stream into n batches (a multiple of world_size), sizes within one row of each other.
        n = math.ceil(self.n_tokens / self.batch_size / self.world_size) * self.world_size
        bounds = [round(j * self.n_tokens / n) for j in range(n + 1)]
        batches, current, taken, block, offset = [], [], 0, 0, 0
        for j in range(n):
            while taken < bounds[j + 1]:
                shard, start, stop = stream[block]
                take = min(stop - start - offset, bounds[j + 1] - taken)
                current.append((shard, start + offset, start + offset + take))
                taken += take
                offset += take
                if start + offset == stop:
                    block, offset = block + 1, 0
            batches.append(current)
            current = []
        return batches[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> ActivationBatch:
        rows = self.batch_rows(index)
        out = tuple(np.empty((rows, self.n_layers, self.d_model), STORAGE_DTYPES[self.dtype]) for _ in SITES)
        self.read_batch_into(index, out)
        return ActivationBatch(*(to_torch(a, self.dtype) for a in out), index=index)

    def batch_rows(self, index: int) -> int:
        """Rows in batch ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        return sum(stop - start for _, start, stop in self._batches[index])

    def read_batch_into(self, index: int, out: tuple[np.ndarray, np.ndarray]) -> None:
        """Read batch ``index`` into two C-contiguous arrays (``resid_mid``, ``mlp_out``) of its size in bytes.

        The arrays may be views of someone else's memory (the activation server passes shared memory).
        """
        rows = self.batch_rows(index)
        for array in out:
            if not array.flags.c_contiguous or array.nbytes != rows * self._row_bytes:
                raise ValueError(
                    f"read_batch_into needs two C-contiguous arrays of {rows * self._row_bytes} bytes."
                )
        at, row = 0, self._row_bytes
        for shard, start, stop in self._batches[index]:
            with self._handles().fds.use(shard) as fd:
                for s, array in enumerate(out):
                    # One positional read per block and site, straight into the batch: the datasets are
                    # contiguous (see store.py), so a block of rows is one byte range of the shard file.
                    flat = array.reshape(-1).view(np.uint8)
                    size = (stop - start) * row
                    read_into(fd, flat[at * row : at * row + size], self._offsets[shard][s] + start * row)
            at += stop - start

    @contextlib.contextmanager
    def batch_ranges(self, index: int) -> Iterator[list[tuple[int, int, int]]]:
        """Batch ``index`` as ``(fd, offset, nbytes)`` ranges of its shard files, in the order ``read_batch_into``
        fills its two arrays (every block's ``resid_mid`` rows, then their ``mlp_out`` rows); the descriptors stay
        open inside the ``with`` block. For sending a batch without reading it (``os.sendfile``)."""
        self.batch_rows(index)  # the range check
        blocks, row = self._batches[index], self._row_bytes
        with contextlib.ExitStack() as stack:
            fds = {shard: stack.enter_context(self._handles().fds.use(shard)) for shard, _, _ in blocks}
            yield [
                (fds[shard], self._offsets[shard][s] + start * row, (stop - start) * row)
                for s in range(len(SITES))
                for shard, start, stop in blocks
            ]

    def open(self) -> DiscBuffer:
        """Open up to ``max_open`` shards now (the rest open when first read); returns self."""
        for shard in range(min(len(self._shard_rows), self.max_open)):
            with self._handles().fds.use(shard):
                pass
        return self

    @property
    def n_open(self) -> int:
        """Files this buffer holds open now (shard descriptors and HDF5 handles), at most ``2 * max_open``."""
        handles = self._handles()
        return len(handles.fds) + len(handles.files)

    # ------------------------------------------------------------------------------------------ file access

    def _shard_path(self, shard: int) -> Path:
        return self.path / self.info["shards"][shard]["file"]

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._open_files = OpenFiles.lazily(self._shard_path, self.max_open)

    def _handles(self) -> OpenFiles:
        if os.getpid() != self._pid:  # a forked DataLoader worker: never use the parent's handles
            self._reset()
        return self._open_files

    @contextlib.contextmanager
    def _file(self, shard: int) -> Iterator[h5py.File]:
        with self._handles().files.use(shard) as f:
            yield f

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_open_files"]  # handles and locks stay with their process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close every open file (one being read now is closed as soon as its reader is done)."""
        if getattr(self, "_pid", None) == os.getpid():
            self._open_files.close()

    def __del__(self) -> None:
        self.close()

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < self.n_tokens:
            raise IndexError(f"row {row} out of range for {self.n_tokens} rows")
        shard = int(np.searchsorted(self._shard_start, row, side="right")) - 1
        return shard, row - int(self._shard_start[shard])

    def _gather(self, name: str, start: int, stop: int) -> np.ndarray:
        """Dataset ``name`` for global rows ``[start, stop)``, across shards."""
        parts = []
        for shard, rows in enumerate(self._shard_rows):
            lo, hi = max(start, self._shard_start[shard]), min(stop, self._shard_start[shard] + rows)
            if lo < hi:
                base = self._shard_start[shard]
                with self._file(shard) as f:
                    parts.append(f[name][lo - base : hi - base])
        return np.concatenate(parts) if parts else np.empty((0,))

    def read(self, start: int, stop: int) -> ActivationBatch:
        """Rows ``[start, stop)`` in file order, in the storage dtype."""
        return ActivationBatch(*(to_torch(self._gather(site, start, stop), self.dtype) for site in SITES))

    def read_inputs(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``resid_mid`` of rows ``[start, stop)`` in float32 on ``device``, ``(rows, n_layers, d_model)``: what
        encoding a block of rows needs, without reading ``mlp_out``, converted once for all layers."""
        return to_torch(self._gather("resid_mid", start, stop), self.dtype).to(device).float()

    def input_blocks(
        self,
        starts: Iterable[int],
        block_size: int,
        *,
        stop: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, end, resid_mid)`` for the block of rows ``[start, end)``, ``end = min(start + block_size,
        stop)``, of each of ``starts``, in float32 on ``device``: ``read_inputs`` for a pass over many blocks. The
        blocks are read (positional reads) and converted into the same two arrays every time, so the tensor a
        block gets is overwritten by the next one. Fresh arrays for every block of 4,096 rows (~0.4 GB at 30 × 576)
        would come as new pages each time: a pass over the default profile's 60,000 rows took 3–5 s that way,
        0.8 s this way."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        staging = np.empty((block_size, self.n_layers, self.d_model), STORAGE_DTYPES[self.dtype])
        out = torch.empty((block_size, self.n_layers, self.d_model), device=device)
        site, row = SITES.index("resid_mid"), self._row_bytes
        for start in starts:
            end = min(start + block_size, stop)
            if not 0 <= start < end:
                raise IndexError(f"block start {start} out of range for rows [0, {stop})")
            for shard, rows in enumerate(self._shard_rows):
                base = int(self._shard_start[shard])
                lo, hi = max(start, base), min(end, base + rows)
                if lo < hi:
                    with self._handles().fds.use(shard) as fd:
                        target = staging[lo - start : hi - start].reshape(-1).view(np.uint8)
                        read_into(fd, target, self._offsets[shard][site] + (lo - base) * row)
            out[: end - start].copy_(to_torch(staging[: end - start], self.dtype))
            yield start, end, out[: end - start]

    def token_info(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, sequence, position)`` arrays for rows ``[start, stop)``."""
        stop = self.n_tokens if stop is None else stop
        return tuple(self._gather(name, start, stop) for name in ("tokens", "sequence", "position"))

    @property
    def sequences(self) -> np.ndarray:
        """``(n_sequences, seq_len)`` token ids of every harvested sequence, in global sequence order."""
        parts = []
        for shard in range(len(self._shard_rows)):
            with self._file(shard) as f:
                parts.append(f["sequences"][()])
        return np.concatenate(parts)

    def context(self, row: int, *, before: int = 8, after: int = 4) -> TokenContext:
        """The tokens around row ``row`` in its sequence (BOS excluded), for showing where a feature fires."""
        shard, local = self._locate(row)
        with self._file(shard) as f:
            seq = int(f["sequence"][local]) - int(f.attrs["first_sequence"])
            pos = int(f["position"][local])
            start = max(1, pos - before)
            return TokenContext(f["sequences"][seq, start : pos + 1 + after].tolist(), pos - start)

    @property
    def origin(self) -> dict:
        """What the rows were harvested from: ``model``, ``corpus`` and ``seq_len`` (the validation during training
        measures the CLT on that model and the corpus's held-out text)."""
        return {
            "model": self.info["model"],
            "corpus": self.info["corpus"],
            "seq_len": int(self.info["seq_len"]),
        }

    @property
    def stats(self) -> NormStats:
        """Mean and RMS scale per layer of both sites, estimated at harvest time (every 8th stored row)."""
        norms = NormAccumulator(self.n_layers, self.d_model)
        for shard in range(len(self._shard_rows)):
            with self._file(shard) as f:
                norms.merge(f["stats_sum"][()], f["stats_sq"][()], int(f["stats_rows"][()]))
        return norms.stats()

    # ------------------------------------------------------------------------------------------ checks

    def check_compatible(self, n_layers: int, d_model: int, *, what: str = "the CLT") -> None:
        """Raise a clear error when this buffer cannot feed a model of ``n_layers`` × ``d_model``."""
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise ValueError(
                f"{self.path} holds {self.n_layers} layers of d_model {self.d_model}, but {what} has "
                f"{n_layers} layers of d_model {d_model}; harvest again for this model or pick the matching buffer."
            )

    def summary(self) -> str:
        """One line of provenance."""
        i = self.info
        size = sum((self.path / s["file"]).stat().st_size for s in i["shards"]) / 2**30
        return (
            f"DiscBuffer {self.path.name}: {self.n_tokens:,} tokens of {' → '.join(json.loads(i['sites']))} × layers {self.layer_start}–"
            f"{self.layer_start + self.n_layers - 1} × d_model {self.d_model} ({self.dtype}, {size:.2f} GiB in "
            f"{len(i['shards'])} shards) of {i['model']} on {i['corpus']}/{i['split']}, seq_len {i['seq_len']}, "
            f"tokenizer {i['tokenizer']}, format v{i['format_version']}"
        )

    def __repr__(self) -> str:
        return self.summary()


def read_into(fd: int, array: np.ndarray | bytearray, offset: int) -> None:
    """Fill ``array`` (C-contiguous) from ``fd`` at ``offset`` with positional reads (safe across threads)."""
    view = memoryview(array).cast("B")
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ValueError(f"Unexpected end of file at byte {offset}: the shard is truncated.")
        view, offset = view[n:], offset + n


def _block_rows(batch_size: int, row_bytes: int, target: int = 2**20) -> int:
    """The largest divisor of ``batch_size`` whose block stays within ``target`` bytes per site (at least 1)."""
    for rows in range(batch_size, 0, -1):
        if batch_size % rows == 0 and rows * row_bytes <= target:
            return rows
    return 1
