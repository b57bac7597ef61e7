"""Writing one shard of a harvest durably: create it allocated up front, commit each batch, finish it.

A batch is committed in two steps (see ``store.py`` for the format): its rows and checksum are written and synced
to the disk, then ``progress`` is overwritten in place. A finished shard gets its statistics, is synced, renamed
from ``.partial`` to its final name, and the rename is synced. ``fsync=False`` skips the syncs but keeps the order.
A shard left unfinished is resumed from the last batch whose checksum still matches.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import torch

from .sites import NormAccumulator, to_torch
from .store import (
    ROW_DATASETS,
    SITES,
    CorruptShard,
    batch_checksum,
    committed_batches,
    open_shard,
    shard_layout,
    shard_name,
    sync_directory,
)

log = logging.getLogger("cltlab")

STATS_STRIDE = 8
"""Normalization statistics are estimated from every STATS_STRIDE-th row of a shard."""


def _create(f: h5py.File, name: str, shape: tuple[int, ...], dtype) -> None:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all space now: later writes touch raw data only
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(shape)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl).close()


def create_shard(
    path: Path, provenance: dict, *, index: int, first_batch: int, n_rows: int, n_sequences: int
) -> h5py.File:
    """Create an empty shard at ``path`` and return it open for writing."""
    f = h5py.File(path, "w")
    for key, value in provenance.items():
        f.attrs[key] = value
    f.attrs.update(shard_index=index, first_batch=first_batch, n_rows=n_rows,
                   first_sequence=first_batch * provenance["batch_size"])  # fmt: skip
    for name, (shape, dtype) in shard_layout(provenance, n_rows, n_sequences).items():
        _create(f, name, shape, dtype)
    for name in ("checksums", "stats_sum", "stats_sq", "stats_rows", "progress"):
        f[name][...] = 0
    f.flush()
    return f


def sync(f: h5py.File) -> None:
    """Push everything written to ``f`` to the disk (HDF5's buffers, then the OS's): a commit point."""
    f.flush()
    os.fdatasync(f.id.get_vfd_handle())


class ShardWriter:
    """One shard being written: its file, the row it has reached, and running statistics.

    The normalization statistics are estimated from every ``STATS_STRIDE``-th row of the shard (the bfloat16 →
    float32 conversion of every row cost 15% of a harvest, and a mean and a scale need far fewer rows). They live
    in memory while the shard is written and go to the file when it is finished; a resumed shard recomputes them
    from its stored rows, batch by batch in the same arithmetic, so they come out bit-identical to an
    uninterrupted run's whatever moment the harvest was killed at. A resumed shard also checks each stored
    batch's checksum and writes again from the first batch whose bytes did not survive (power loss with
    ``fsync=False``, a disk that lied).
    """

    def __init__(self, f: h5py.File, partial: Path, final: Path, *, fsync: bool):
        self.f, self.partial, self.final, self.fsync = f, partial, final, fsync
        self.first_batch, self.layer_start = int(f.attrs["first_batch"]), int(f.attrs["layer_start"])
        self.batch_size = int(f.attrs["batch_size"])  # sequences per forward batch
        self.dtype = str(f.attrs["dtype"])
        self.rows, self.batches = 0, 0
        self.norms = NormAccumulator(*f["stats_sum"].shape[1:])  # of every STATS_STRIDE-th row
        for k, start, stop, stored, crc, recorded in committed_batches(f):
            if crc != recorded:
                log.warning("%s: batch %d did not survive intact; writing again from there", partial.name, k)
                break
            for s, site in enumerate(SITES):
                self._add_stats(s, to_torch(stored[site], self.dtype), start)
            self.rows, self.batches = stop, k + 1

    def _add_stats(self, site: int, x: torch.Tensor, first_row: int) -> None:
        """Add the rows of ``x`` (shard rows from ``first_row`` on) that fall on the stride to the statistics."""
        self.norms.add(site, x[(-first_row) % STATS_STRIDE :: STATS_STRIDE])

    def _commit(self) -> None:
        """Everything written so far reaches the disk before anything written next."""
        if self.fsync:
            sync(self.f)
        else:
            self.f.flush()

    def write(
        self, batch: int, ids: torch.Tensor, acts: tuple[list[torch.Tensor], ...], take: int, ready, peaks
    ) -> None:
        """Shuffle batch ``batch`` (global index) within itself and write its first ``take`` rows.

        ``acts`` holds, per site, the per-layer ``(batch, seq, d_model)`` tensors in the storage dtype; ``peaks``
        their ``(2, n_layers, 2)`` minima and maxima when stored as float16 (else None).
        """
        if ready is not None:
            ready.synchronize()  # the device→host copy
        if peaks is not None:
            self._refuse_overflow(batch, peaks)
        B, T = ids.shape
        # Rows (sequence b, position p >= 1) of the batch, in a seeded random order: (take,) indices into B·T.
        order = torch.randperm(B * (T - 1), generator=torch.Generator().manual_seed(batch))[:take]
        index = (order // (T - 1)) * T + 1 + order % (T - 1)
        arrays = {}
        for site, layers in zip(SITES, acts, strict=True):
            # Gather the shuffled rows layer by layer straight into (take, n_layers, d_model): no stacked copy.
            x = torch.empty(take, len(layers), layers[0].shape[-1], dtype=layers[0].dtype)
            for layer, values in enumerate(layers):
                x[:, layer] = values.reshape(B * T, -1)[index]
            arrays[site] = x.numpy()
        arrays["tokens"] = ids.reshape(-1)[index].to(torch.int32).numpy()
        arrays["sequence"] = (batch * B + index // T).numpy()
        arrays["position"] = (index % T).to(torch.int32).numpy()
        self.write_rows(batch, arrays, ids.to(torch.int32).numpy())

    def write_rows(self, batch: int, arrays: dict[str, np.ndarray], sequences: np.ndarray) -> None:
        """Commit forward batch ``batch`` (global index): ``arrays`` holds its rows of every ``ROW_DATASETS``
        dataset, in the order they are stored (the sites in the storage dtype), ``sequences`` its sequences."""
        rows = np.s_[self.rows : self.rows + len(arrays["tokens"])]
        for s, site in enumerate(SITES):
            self._add_stats(s, to_torch(arrays[site], self.dtype), self.rows)
        for name in ROW_DATASETS:
            self.f[name].write_direct(arrays[name], dest_sel=rows)
        first = (batch - self.first_batch) * self.batch_size
        self.f["sequences"].write_direct(sequences, dest_sel=np.s_[first : first + len(sequences)])
        crc = batch_checksum([*(arrays[name] for name in ROW_DATASETS), sequences])
        self.f["checksums"].write_direct(
            np.array([crc], np.uint32), dest_sel=np.s_[self.batches : self.batches + 1]
        )
        self._commit()  # the rows and their checksum first, then the progress that vouches for them
        self.rows, self.batches = self.rows + len(arrays["tokens"]), self.batches + 1
        self.f["progress"][...] = (self.rows, self.batches)
        self.f.flush()

    def _refuse_overflow(self, batch: int, peaks: torch.Tensor) -> None:
        """Refuse a batch with values beyond float16's range (they would be stored as inf)."""
        beyond = torch.isinf(peaks.float()).any(-1)  # (2, n_layers)
        if beyond.any():
            s, layer = (int(v) for v in beyond.nonzero()[0])
            raise ValueError(
                f"{SITES[s]} of layer {self.layer_start + layer} holds values beyond float16's range (±65504) in "
                f"forward batch {batch}; float16 would store them as inf. Harvest with dtype='bfloat16' (same "
                "size, float32's range) or 'float32' into a new folder."
            )

    def finish(self) -> None:
        self.f["stats_sum"][...] = self.norms.sums
        self.f["stats_sq"][...] = self.norms.squares
        self.f["stats_rows"][...] = self.norms.rows
        self._commit()
        self.f.close()
        os.replace(self.partial, self.final)
        if self.fsync:
            sync_directory(self.final.parent)

    def abort(self) -> None:
        """Close the file of a shard left unfinished by an error (it is resumed from its progress next time)."""
        if self.f.id.valid:
            try:
                self.f.close()
            except OSError as err:  # e.g. the disk is still full: the progress on disk stands
                log.warning("Closing %s after an error: %s", self.partial.name, err)


def open_shard_for_writing(
    directory: Path, provenance: dict, index: int, n_rows: int, n_batches: int, fsync: bool
) -> ShardWriter:
    """Resume shard ``index`` or create it (call only while holding the job's ``HarvestLock``)."""
    final = directory / shard_name(index)
    partial = final.with_name(final.name + ".partial")
    first_batch = index * provenance["shard_batches"]
    if partial.exists():
        try:
            shard = ShardWriter(open_shard(partial, "r+"), partial, final, fsync=fsync)
            log.info("Resuming %s at row %d", partial.name, shard.rows)
            return shard
        # Killed before the shard's creation reached the disk: start the shard again.
        except CorruptShard as err:
            log.warning("Starting %s again: %s", partial.name, err)
            partial.unlink()
    f = create_shard(
        partial, provenance, index=index, first_batch=first_batch, n_rows=n_rows,
        n_sequences=n_batches * provenance["batch_size"],
    )  # fmt: skip
    return ShardWriter(f, partial, final, fsync=fsync)
