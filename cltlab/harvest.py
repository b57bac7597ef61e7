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
on its shards for its lifetime (``locks.HarvestLock``): a second harvest of the same shards is refused, never
interleaved. Each batch is synced to the disk before the progress that counts it (``shard_writer.py``; ``fsync=False``
skips the syncs, keeping the order, for scratch data on a machine that will not lose power).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import h5py
import torch
from tqdm.auto import tqdm

from .config import HarvestConfig
from .corpus import token_sequences
from .locks import HarvestLock
from .models import LoadedModel, load_model
from .precision import model_dtype, resolve_device
from .shard_writer import open_shard_for_writing
from .sites import row_bytes, to_storage, trace_layers
from .store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SITES,
    disk_full,
    disk_full_error,
    mismatches,
    rows_per_batch,
    shard_name,
    write_manifest,
)

log = logging.getLogger("cltlab")


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
    both_sites = 2 * row_bytes(layer_stop - layer_start, model.d_model, config.dtype)
    shard_tokens = config.shard_tokens or max(per_batch, 2**31 // both_sites)  # ~2 GiB shards by default
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
        "cltlab_version": importlib.metadata.version("cltlab"),
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


def check_existing(directory: Path, provenance: dict) -> dict | None:
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


def _guarded(directory: Path, need: int, write: Callable[..., None], *args) -> None:
    """``write(*args)``, a full disk reported as one sentence (see ``_clear_disk_full``)."""
    with _clear_disk_full(directory, need):
        write(*args)


def _next_batch(batches, number: int, n_batches: int, config: HarvestConfig) -> torch.Tensor:
    """The ids of forward batch ``number``, skipping what earlier shards or runs already hold."""
    batch, ids = next(batches, (None, None))
    while batch is not None and batch < number:
        batch, ids = next(batches, (None, None))
    if batch is None:
        raise ValueError(
            f"Corpus {config.corpus!r} ({config.split}) ran out before batch {number} of {n_batches}; "
            "ask for fewer tokens."
        )
    return ids


def _trace_to_host(model: LoadedModel, ids: torch.Tensor, layers: tuple[int, int], dtype: str, stream):
    """Trace one forward batch into the storage dtype and start its copy to the host: the per-site lists of
    per-layer host tensors, the CUDA event that marks the copy done (None on the CPU), and the float16 peaks."""
    resid, mlp, _ = trace_layers(model, ids, *layers)
    stored = tuple([to_storage(x, dtype) for x in site] for site in (resid, mlp))
    peaks = _to_host(_peaks(stored), stream) if dtype == "float16" else None
    host = tuple([_to_host(x, stream) for x in site] for site in stored)
    ready = torch.cuda.Event() if stream is not None else None
    if ready is not None:
        ready.record(stream)
    return host, ready, peaks


def _peaks(stored: tuple[list[torch.Tensor], ...]) -> torch.Tensor:
    """``(2, n_layers, 2)`` minimum and maximum of each site and layer (inf where float16 overflowed)."""
    return torch.stack([torch.stack([torch.stack(torch.aminmax(x)) for x in site]) for site in stored])


def load_harvest_model(config: HarvestConfig, device: str | torch.device = "auto") -> LoadedModel:
    """``config.model`` as ``harvest`` runs it: in ``config.model_dtype`` on ``device`` (``auto``: the GPU when there
    is one), or in float32 on a CPU without fast bfloat16 (bf16 matmuls are several times slower there)."""
    device = resolve_device(device)
    return load_model(config.model, dtype=model_dtype(config.model_dtype, device), device=device)


def harvest(
    config: HarvestConfig,
    path: str | Path,
    *,
    model: LoadedModel | None = None,
    device: str | None = "auto",
    job: tuple[int, int] = (0, 1),
    progress: bool = True,
    fsync: bool = True,
) -> HarvestResult:
    """Harvest ``config.n_tokens`` rows of activations into the folder ``path`` (resuming if it was interrupted).

    ``job=(i, n)`` writes only shards i, i+n, i+2n, ... so n jobs (on one machine or many sharing a file system)
    can harvest one folder together; each job's result says whether the folder is complete yet. A harvest whose
    shards another live harvest is writing is refused (``locks.HarvestBusy``). ``fsync=False`` skips the syncs
    that make each committed batch survive power loss (see ``store.py``).
    """
    path = Path(path)
    job_index, n_jobs = job
    if not 0 <= job_index < n_jobs:
        raise ValueError(f"job must be (i, n) with 0 <= i < n, not {job}.")
    model = model or load_harvest_model(config, device)
    layer_start, layer_stop = config.layers or (0, model.n_layers)
    if layer_stop > model.n_layers:
        raise ValueError(f"layers {config.layers} exceed the {model.n_layers} layers of {config.model!r}.")
    provenance = _provenance(config, model, layer_start, layer_stop)
    manifest = check_existing(path, provenance)
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
    shard_bytes = per_shard * per_batch * 2 * row_bytes(layers[1] - layers[0], model.d_model, config.dtype)
    todo = [i for i in range(job[0], n_shards, job[1]) if not (path / shard_name(i)).exists()]
    stream = torch.cuda.Stream() if model.device.type == "cuda" else None
    batches = enumerate(
        token_sequences(config.corpus, model.tokenizer, seq_len=T, bos_token_id=model.bos_token_id,
                        split=config.split, batch_size=B)
    )  # fmt: skip
    writer = _Writer()
    bar = tqdm(total=0, unit="tok", desc=f"harvest {config.model}", disable=not progress)
    written, opened = 0, []

    try:
        for index in todo:
            first, last = index * per_shard, min((index + 1) * per_shard, n_batches)
            shard_rows = min(n, last * per_batch) - first * per_batch
            writer.raise_error()  # no new shard after a failed write
            with _clear_disk_full(path, shard_bytes):
                shard = open_shard_for_writing(path, provenance, index, shard_rows, last - first, fsync)
            opened.append(shard)
            bar.total += shard_rows - shard.rows
            bar.refresh()
            for number in range(first + shard.batches, last):
                ids = _next_batch(batches, number, n_batches, config)
                host, ready, peaks = _trace_to_host(model, ids, layers, config.dtype, stream)
                take = min(per_batch, n - number * per_batch)
                writer.put(
                    functools.partial(
                        _guarded, path, shard_bytes, shard.write, number, ids, host, take, ready, peaks
                    )
                )
                written += take
                bar.update(take)
            writer.put(functools.partial(_guarded, path, shard_bytes, shard.finish))
        writer.close()
        writer.raise_error()
    finally:
        bar.close()
        writer.close()
        for shard in opened:
            shard.abort()
    return written
