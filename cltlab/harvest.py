"""Harvest ``resid_mid`` and ``mlp_out`` of a range of layers with nnsight into a DiscBuffer folder.

The trace stops right after the last needed MLP, so the rest of the model and the LM head never run. The
activations stay in the storage dtype from the device on; a background thread shuffles and writes them (and on
a GPU the device→host copy runs on a side stream), so the model does not wait on the disk.

BOS positions are not stored (their activations are outliers a transcoder should not spend features on; the
replacement model passes them through unchanged). Rows are shuffled within each forward batch before writing.

The harvest is resumable: progress is recorded in each shard (see ``store.py``), so a harvest killed at any
moment (or stopped by a full disk) and started again with the same arguments continues where it stopped and ends
with exactly the rows an uninterrupted run writes. Different arguments are refused. A large harvest can be split
into jobs (``job=(i, n)`` writes every n-th shard), each adding its shards to the same folder. A job holds a lock
on its shards for its lifetime (``store.HarvestLock``): a second harvest of the same shards is refused, never
interleaved. Each batch is synced to the disk before the progress that counts it (``fsync=False`` skips the syncs,
keeping the order, for scratch data on a machine that will not lose power).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .buffer import to_storage, to_torch
from .config import HarvestConfig
from .corpus import token_sequences
from .models import LoadedModel, load_model
from .precision import model_dtype
from .store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROW_DATASETS,
    SITES,
    STORAGE_DTYPES,
    CorruptShard,
    HarvestLock,
    batch_checksum,
    create_shard,
    disk_full,
    disk_full_error,
    mismatches,
    open_shard,
    rows_per_batch,
    shard_name,
    sync,
    sync_directory,
    write_manifest,
)

log = logging.getLogger("cltlab")

STATS_STRIDE = 8
"""Normalization statistics are estimated from every STATS_STRIDE-th row of a shard."""


class SiteActivations(NamedTuple):
    """Activations of the two sites for a batch of sequences."""

    resid_mid: torch.Tensor
    """``(batch, seq, n_layers, d_model)``"""
    mlp_out: torch.Tensor
    """``(batch, seq, n_layers, d_model)``"""
    logits: torch.Tensor | None = None
    """``(batch, seq, vocab)`` when the whole model was run (``with_logits=True``), else None."""


@torch.no_grad()
def trace_sites(
    model: LoadedModel, ids: torch.Tensor, layer_start: int, layer_stop: int, *, with_logits: bool = False
) -> SiteActivations:
    """Run ``ids`` ``(batch, seq)`` through the model with nnsight and return both sites of the given layers.

    Without ``with_logits`` the run stops right after the last needed MLP.
    """
    resid, mlp, logits = _trace_layers(model, ids, layer_start, layer_stop, with_logits)
    return SiteActivations(torch.stack(resid, 2), torch.stack(mlp, 2), logits)


@torch.no_grad()
def _trace_layers(
    model: LoadedModel, ids: torch.Tensor, layer_start: int, layer_stop: int, with_logits: bool
):
    """The sites as per-layer lists of ``(batch, seq, d_model)`` tensors, and the logits or None."""
    blocks = model.envoy_blocks()
    resid, mlp, out = [], [], {}
    with model.envoy.trace(ids.to(model.device), use_cache=False) as tracer:
        for layer in range(layer_start, layer_stop):
            block = blocks[layer]
            resid.append(getattr(block, model.sites.pre_mlp_norm).input.save())
            mlp.append(getattr(block, model.sites.mlp).output.save())
        if with_logits:
            out["logits"] = model.envoy.output.logits.save()
        else:
            tracer.stop()  # nothing after the last needed MLP runs
    return resid, mlp, out.get("logits")


class HarvestResult(NamedTuple):
    """What ``harvest`` did."""

    path: Path
    """The harvest folder."""
    n_tokens: int
    """Rows stored in the folder so far (all of them once the harvest is complete)."""
    seconds: float
    """Wall time of this call (0 when an identical finished harvest was reused)."""
    reused: bool
    """True when a finished harvest with the same arguments was already there."""
    complete: bool
    """True when every shard of the harvest is written (False while other jobs still have shards to write)."""

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else float("nan")


def _provenance(config: HarvestConfig, model: LoadedModel, layer_start: int, layer_stop: int) -> dict:
    per_batch = config.batch_size * (config.seq_len - 1)
    row_bytes = (
        2 * (layer_stop - layer_start) * model.d_model * np.dtype(STORAGE_DTYPES[config.dtype]).itemsize
    )
    shard_tokens = config.shard_tokens or max(per_batch, 2**31 // row_bytes)  # ~2 GiB shards by default
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.model,
        "corpus": config.corpus,
        "split": config.split,
        "sites": json.dumps(list(SITES)),
        "layer_start": layer_start,
        "layer_stop": layer_stop,
        "d_model": model.d_model,
        "dtype": config.dtype,
        "model_dtype": config.model_dtype,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "n_tokens": config.n_tokens,
        "shard_batches": max(1, shard_tokens // per_batch),
        "tokenizer": f"{type(model.tokenizer).__name__}(vocab={len(model.tokenizer)})",
        "bos_token_id": model.bos_token_id,
        "config": json.dumps(dataclasses.asdict(config)),
        "cltlab_version": __version__,
    }


class _Writer:
    """Runs write jobs in order on a daemon thread; an error there is raised in the harvesting thread."""

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cltlab-harvest-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:  # after an error, keep draining so the producer never blocks
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = err

    def put(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def raise_error(self) -> None:
        """Raise the writer's error (a clear one: a full disk, a value float16 cannot hold) as it was raised."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every write to finish (without raising; see ``raise_error``)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


@contextlib.contextmanager
def _clear_disk_full(directory: Path, need: int):
    """Turn an error that says the disk is full (OS or HDF5) into one sentence naming the folder and free space."""
    try:
        yield
    except OSError as err:
        if disk_full(err):
            raise disk_full_error(directory, need) from err
        raise


class _Shard:
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
        self.rows, self.batches = 0, 0
        self.sums, self.squares = np.zeros(f["stats_sum"].shape), np.zeros(f["stats_sq"].shape)
        self.stats_rows = 0
        rows, batches = (int(v) for v in f["progress"][()])
        per_batch, B = rows_per_batch(f.attrs), int(f.attrs["batch_size"])
        recorded = f["checksums"][()]
        for k in range(batches):
            start, stop = k * per_batch, min((k + 1) * per_batch, rows)
            stored = {name: f[name][start:stop] for name in ROW_DATASETS}
            if batch_checksum([*stored.values(), f["sequences"][k * B : (k + 1) * B]]) != recorded[k]:
                log.warning("%s: batch %d did not survive intact; writing again from there", partial.name, k)
                break
            for s, site in enumerate(SITES):
                self._add_stats(s, to_torch(stored[site], f.attrs["dtype"]), start)
            self.rows, self.batches = stop, k + 1

    def _add_stats(self, site: int, x: torch.Tensor, first_row: int) -> None:
        """Add the rows of ``x`` (shard rows from ``first_row`` on) that fall on the stride to the statistics."""
        x = x[(-first_row) % STATS_STRIDE :: STATS_STRIDE]
        self.stats_rows += len(x) if site == 0 else 0
        # float32 within a batch, float64 across batches.
        self.sums[site] += x.sum(0, dtype=torch.float32).double().numpy()
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (rows, n_layers)
        self.squares[site] += norms.square().sum(0, dtype=torch.float64).numpy()

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
        rows = np.s_[self.rows : self.rows + take]
        arrays = {}
        for s, (site, layers) in enumerate(zip(SITES, acts, strict=True)):
            # Gather the shuffled rows layer by layer straight into (take, n_layers, d_model): no stacked copy.
            x = torch.empty(take, len(layers), layers[0].shape[-1], dtype=layers[0].dtype)
            for layer, values in enumerate(layers):
                x[:, layer] = values.reshape(B * T, -1)[index]
            arrays[site] = x.numpy()
            self._add_stats(s, x.view(torch.bfloat16) if x.dtype == torch.uint16 else x, self.rows)
        arrays["tokens"] = ids.reshape(-1)[index].to(torch.int32).numpy()
        arrays["sequence"] = (batch * B + index // T).numpy()
        arrays["position"] = (index % T).to(torch.int32).numpy()
        sequences = ids.to(torch.int32).numpy()
        for name in ROW_DATASETS:
            self.f[name].write_direct(arrays[name], dest_sel=rows)
        first = (batch - self.first_batch) * B
        self.f["sequences"].write_direct(sequences, dest_sel=np.s_[first : first + B])
        crc = batch_checksum([*(arrays[name] for name in ROW_DATASETS), sequences])
        self.f["checksums"].write_direct(
            np.array([crc], np.uint32), dest_sel=np.s_[self.batches : self.batches + 1]
        )
        self._commit()  # the rows and their checksum first, then the progress that vouches for them
        self.rows, self.batches = self.rows + take, self.batches + 1
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
        self.f["stats_sum"][...] = self.sums
        self.f["stats_sq"][...] = self.squares
        self.f["stats_rows"][...] = self.stats_rows
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


def _open_shard_for_writing(
    directory: Path, provenance: dict, index: int, n_rows: int, n_batches: int, fsync: bool
) -> _Shard:
    """Resume shard ``index`` or create it (call only while holding the job's ``HarvestLock``)."""
    final = directory / shard_name(index)
    partial = final.with_name(final.name + ".partial")
    first_batch = index * provenance["shard_batches"]
    if partial.exists():
        try:
            shard = _Shard(open_shard(partial, "r+"), partial, final, fsync=fsync)
            log.info("Resuming %s at row %d", partial.name, shard.rows)
            return shard
        except (
            CorruptShard
        ) as err:  # killed before the shard's creation reached the disk: start the shard again
            log.warning("Starting %s again: %s", partial.name, err)
            partial.unlink()
    f = create_shard(
        partial, provenance, index=index, first_batch=first_batch, n_rows=n_rows,
        n_sequences=n_batches * provenance["batch_size"],
    )  # fmt: skip
    return _Shard(f, partial, final, fsync=fsync)


def _check_existing(directory: Path, provenance: dict) -> dict | None:
    """Refuse a folder holding a different harvest; return its manifest if it has one."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; a harvest writes a folder. Choose another path.")
    manifest = None
    if (directory / MANIFEST).exists():
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{directory / MANIFEST} is not valid JSON ({err}); delete it and run the harvest again "
                "(finished shards are kept)."
            ) from None
        found = [(directory / MANIFEST, mismatches(manifest, provenance))]
    else:
        found = []
    for path in sorted(directory.glob("shard-*.h5*")):
        try:
            with h5py.File(path, "r") as f:
                found.append((path, mismatches(dict(f.attrs), provenance)))
        except OSError:
            continue  # an unreadable partial shard (damaged, or being written) is looked at under the lock
    for path, changed in found:
        if changed:
            raise ValueError(
                f"{path} was harvested with different arguments ({', '.join(changed)}); "
                "delete the folder or choose another path."
            )
    return manifest


def _to_host(tensor: torch.Tensor, stream) -> torch.Tensor:
    """Start the copy of a device tensor into pinned host memory on ``stream`` (a no-op on the CPU)."""
    if stream is None:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream.wait_stream(
        torch.cuda.current_stream(tensor.device)
    )  # the tensor must be computed before it is copied
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)
    return host


def _peaks(stored: tuple[list[torch.Tensor], ...]) -> torch.Tensor:
    """``(2, n_layers, 2)`` minimum and maximum of each site and layer (inf where float16 overflowed)."""
    return torch.stack([torch.stack([torch.stack(torch.aminmax(x)) for x in site]) for site in stored])


def harvest(
    config: HarvestConfig,
    path: str | Path,
    *,
    model: LoadedModel | None = None,
    device: str | None = None,
    job: tuple[int, int] = (0, 1),
    progress: bool = True,
    fsync: bool = True,
) -> HarvestResult:
    """Harvest ``config.n_tokens`` rows of activations into the folder ``path`` (resuming if it was interrupted).

    ``job=(i, n)`` writes only shards i, i+n, i+2n, ... so n jobs (on one machine or many sharing a file system)
    can harvest one folder together; each job's result says whether the folder is complete yet. A harvest whose
    shards another live harvest is writing is refused (``store.HarvestBusy``). ``fsync=False`` skips the syncs
    that make each committed batch survive power loss (see ``store.py``).
    """
    path = Path(path)
    job_index, n_jobs = job
    if not 0 <= job_index < n_jobs:
        raise ValueError(f"job must be (i, n) with 0 <= i < n, not {job}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model or load_model(config.model, dtype=model_dtype(config.model_dtype, device), device=device)
    layer_start, layer_stop = config.layers or (0, model.n_layers)
    if layer_stop > model.n_layers:
        raise ValueError(f"layers {config.layers} exceed the {model.n_layers} layers of {config.model!r}.")
    provenance = _provenance(config, model, layer_start, layer_stop)
    manifest = _check_existing(path, provenance)
    if manifest is not None and manifest.get("complete"):
        log.info("Reusing finished harvest %s", path)
        return HarvestResult(path, int(manifest["n_written"]), 0.0, True, True)

    start_time = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    n_batches = math.ceil(config.n_tokens / rows_per_batch(provenance))
    n_shards = math.ceil(n_batches / provenance["shard_batches"])
    with HarvestLock(path, job, n_shards):  # refuses while a live harvest writes any of these shards
        written = _harvest_shards(
            config, path, model, provenance, job, n_shards, (layer_start, layer_stop), progress, fsync
        )
        manifest = write_manifest(path, provenance, n_shards, fsync=fsync)
    seconds = time.perf_counter() - start_time
    log.info("Harvested %d tokens in %.1f s into %s", written, seconds, path)
    return HarvestResult(path, int(manifest["n_written"]), seconds, False, bool(manifest["complete"]))


def _harvest_shards(
    config: HarvestConfig,
    path: Path,
    model: LoadedModel,
    provenance: dict,
    job: tuple[int, int],
    n_shards: int,
    layers: tuple[int, int],
    progress: bool,
    fsync: bool,
) -> int:
    """Write this job's unfinished shards; return the rows written."""
    n, T, B = config.n_tokens, config.seq_len, config.batch_size
    per_batch = rows_per_batch(provenance)
    n_batches = math.ceil(n / per_batch)
    per_shard = provenance["shard_batches"]
    itemsize = np.dtype(STORAGE_DTYPES[config.dtype]).itemsize
    shard_bytes = per_shard * per_batch * 2 * (layers[1] - layers[0]) * model.d_model * itemsize
    todo = [i for i in range(job[0], n_shards, job[1]) if not (path / shard_name(i)).exists()]
    stream = torch.cuda.Stream() if model.device.type == "cuda" else None
    batches = enumerate(
        token_sequences(config.corpus, model.tokenizer, seq_len=T, bos_token_id=model.bos_token_id,
                        split=config.split, batch_size=B)
    )  # fmt: skip
    writer = _Writer()
    bar = tqdm(total=0, unit="tok", desc=f"harvest {config.model}", disable=not progress)
    written, opened = 0, []

    def guarded(write: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with _clear_disk_full(path, shard_bytes):
                write()

        return run

    try:
        for index in todo:
            first, last = index * per_shard, min((index + 1) * per_shard, n_batches)
            shard_rows = min(n, last * per_batch) - first * per_batch
            writer.raise_error()  # no new shard after a failed write
            with _clear_disk_full(path, shard_bytes):
                shard = _open_shard_for_writing(path, provenance, index, shard_rows, last - first, fsync)
            opened.append(shard)
            bar.total += shard_rows - shard.rows
            bar.refresh()
            for number in range(first + shard.batches, last):
                batch, ids = next(batches, (None, None))
                while batch is not None and batch < number:  # skip what earlier shards or runs already hold
                    batch, ids = next(batches, (None, None))
                if batch is None:
                    raise ValueError(
                        f"Corpus {config.corpus!r} ({config.split}) ran out before batch {number} of {n_batches}; "
                        "ask for fewer tokens."
                    )
                resid, mlp, _ = _trace_layers(model, ids, *layers, with_logits=False)
                stored = tuple([to_storage(x, config.dtype) for x in site] for site in (resid, mlp))
                peaks = _to_host(_peaks(stored), stream) if config.dtype == "float16" else None
                host = tuple([_to_host(x, stream) for x in site] for site in stored)
                ready = torch.cuda.Event() if stream is not None else None
                if ready is not None:
                    ready.record(stream)
                take = min(per_batch, n - number * per_batch)
                writer.put(guarded(functools.partial(shard.write, number, ids, host, take, ready, peaks)))
                written += take
                bar.update(take)
            writer.put(guarded(shard.finish))
        writer.close()
        writer.raise_error()
    finally:
        bar.close()
        writer.close()
        for shard in opened:
            shard.abort()
    return written
