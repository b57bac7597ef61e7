"""The on-disk format of harvested activations: a folder of HDF5 shards and a small JSON manifest.

    activations/
      manifest.json        provenance, the shard list, ``complete``       (written atomically, under .lock)
      shard-00000.h5       one shard per run of consecutive forward batches
      shard-00001.h5.partial   a shard being written (renamed when finished)
      .harvest-0-of-1.lock     held (flock) by the harvest writing job 0 of 1, for its lifetime   (see locks.py)
      .lock                    held (flock) for a moment while the manifest is merged or a job's lock is taken

A shard holds, with every dataset contiguous and allocated when the shard is created::

    resid_mid  (n_rows, n_layers, d_model)   float16 / float32 / bfloat16 stored as its uint16 bits
    mlp_out    (n_rows, n_layers, d_model)
    tokens     (n_rows,)        int32   token id of each row
    sequence   (n_rows,)        int64   global index of the row's sequence
    position   (n_rows,)        int32   position in that sequence (0 is BOS, never stored)
    sequences  (n_sequences, seq_len)  int32  the shard's sequences, BOS included (global index = first_sequence + i)
    checksums  (n_batches,)     uint32  CRC-32 of each forward batch's bytes (see ``batch_checksum``)
    stats_sum  (2, n_layers, d_model) float64  Σx of resid_mid and mlp_out over every 8th row (see shard_writer.py)
    stats_sq   (2, n_layers)          float64  Σ‖x‖² over the same rows
    stats_rows ()                     int64    how many rows those sums cover
    progress   (2,)             int64   rows written, forward batches written

Because all space is allocated up front and progress is a dataset overwritten in place, writing a batch never
changes HDF5 metadata: a process killed at any moment (SIGKILL included) leaves a shard that opens. A batch is
committed in two steps: its rows and checksum are written and synced to the disk (``fdatasync``), then
``progress`` is overwritten. So ``progress`` never reaches the disk before the rows it counts, even on power loss,
and the checksums find rows damaged after that (``verify``).

This module names the format and reads it: opening and checking shards, the manifest, ``verify``. Shards are
created and written by ``shard_writer.py``; the locks that keep two harvests apart live in ``locks.py``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import resource
import shutil
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .locks import folder_lock

FORMAT = "cltlab.activations"
FORMAT_VERSION = 3
"""3: shards gained ``checksums``. Version 2 folders must be harvested again."""
MANIFEST = "manifest.json"
SITES = ("resid_mid", "mlp_out")
ROW_DATASETS = (*SITES, "tokens", "sequence", "position")
"""The datasets with one entry per row, in the order a batch's checksum covers them (then its ``sequences``)."""
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 bits as uint16
# Arguments that must match for two harvests to be the same data (config/version strings excluded).
IDENTITY = (
    "format", "format_version", "model", "corpus", "split", "layer_start", "layer_stop", "d_model", "dtype", "model_dtype",
    "seq_len", "batch_size", "n_tokens", "shard_batches", "tokenizer", "bos_token_id",
)  # fmt: skip
# Words in HDF5's messages that prove a file is not (or no longer) a whole HDF5 file.
_CORRUPT = ("signature not found", "truncated file", "bad object header", "corrupt", "checksum", "superblock")


class CorruptShard(ValueError):
    """A shard file that is proven damaged (not HDF5, truncated, or lacking datasets): the only kind ever deleted."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def rows_per_batch(info: dict) -> int:
    """Rows one forward batch stores (BOS positions are not stored)."""
    return int(info["batch_size"]) * (int(info["seq_len"]) - 1)


def shard_layout(info: dict, n_rows: int, n_sequences: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every dataset of a shard of ``n_rows`` rows and ``n_sequences`` sequences."""
    L = int(info["layer_stop"]) - int(info["layer_start"])
    d, T, B = int(info["d_model"]), int(info["seq_len"]), int(info["batch_size"])
    activations = ((n_rows, L, d), np.dtype(STORAGE_DTYPES[info["dtype"]]))
    return {
        "resid_mid": activations,
        "mlp_out": activations,
        "tokens": ((n_rows,), np.dtype(np.int32)),
        "sequence": ((n_rows,), np.dtype(np.int64)),
        "position": ((n_rows,), np.dtype(np.int32)),
        "sequences": ((n_sequences, T), np.dtype(np.int32)),
        "checksums": ((-(-n_sequences // B),), np.dtype(np.uint32)),
        "stats_sum": ((2, L, d), np.dtype(np.float64)),
        "stats_sq": ((2, L), np.dtype(np.float64)),
        "stats_rows": ((), np.dtype(np.int64)),
        "progress": ((2,), np.dtype(np.int64)),
    }


def batch_checksum(arrays: Iterable[np.ndarray]) -> int:
    """The checksum of a batch: CRC-32 of the CRC-32s of the 4 MiB pieces of its rows of each of ``ROW_DATASETS``,
    then of its ``sequences``, in order.

    Pieces rather than one running CRC so that large batches are checked by several threads (CRC-32 runs at about
    2 GB/s on one core, slower than a harvest on a GPU writes); the result does not depend on the thread count.
    """
    pieces = []
    for array in arrays:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        pieces += [data[i : i + CHECKSUM_PIECE] for i in range(0, len(data), CHECKSUM_PIECE)]
    crcs = _checksum_pool().map(zlib.crc32, pieces) if len(pieces) > 2 else map(zlib.crc32, pieces)
    return zlib.crc32(np.fromiter(crcs, np.uint32, len(pieces)))


CHECKSUM_PIECE = 1 << 22


@functools.cache
def _checksum_pool() -> ThreadPoolExecutor:
    """Threads for checksums, started on first use (zlib releases the GIL while it sums)."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="cltlab-checksum")


def sync_directory(directory: Path) -> None:
    """Make the names created or renamed in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ opening


def open_shard(path: Path, mode: str = "r") -> h5py.File:
    """Open a shard, turning every way it can be unreadable into one clear error naming the file.

    Only a proven damaged file raises ``CorruptShard``; a file in use, too many open files or a missing file
    raise an ``OSError`` saying so.
    """
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise open_error(path, err) from None
    try:
        check_format(dict(f.attrs), path)
        missing = {*ROW_DATASETS, "sequences", "checksums", "progress"} - set(f.keys())
        if missing:
            raise CorruptShard(
                f"{path} lacks {sorted(missing)}: the shard is damaged; delete it and harvest again."
            )
        if f["progress"][0] > f.attrs["n_rows"]:
            raise CorruptShard(f"{path} claims more rows than it has room for: the shard is damaged.")
    except Exception:
        f.close()
        raise
    return f


def open_error(path: Path, err: OSError) -> Exception:
    """The clear error for a failed open of ``path``: what went wrong, not a guess."""
    text = str(err)
    if err.errno in (errno.EMFILE, errno.ENFILE) or "errno = 24" in text or "errno = 23" in text:
        return too_many_open_files(path)
    if isinstance(err, FileNotFoundError) or "errno = 2," in text:
        return FileNotFoundError(errno.ENOENT, f"{path} does not exist")
    if "unable to lock file" in text:
        return BlockingIOError(
            errno.EAGAIN, f"{path} is open for writing in another process (a harvest?); wait for it to finish"
        )
    if any(word in text for word in _CORRUPT):
        return CorruptShard(f"{path} is not a readable HDF5 shard (truncated or corrupt?): {err}")
    return OSError(err.errno, f"{path} could not be opened: {err}")


def too_many_open_files(path: Path) -> OSError:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OSError(
        errno.EMFILE,
        f"Too many open files: could not open {path}; this process may hold {soft} (`ulimit -n`). Raise the "
        "limit, or open fewer shards at once (DiscBuffer(max_open=...)).",
    )


def check_format(info: dict, where: Path) -> None:
    if info.get("format") != FORMAT:
        raise ValueError(f"{where} is not a cltlab activation buffer (format {info.get('format')!r}).")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has buffer format version {info.get('format_version')}; this cltlab reads version "
            f"{FORMAT_VERSION} (version 3 added per-batch checksums). Harvest it again with this version."
        )


def check_shard(f: h5py.File, manifest: dict, n_rows: int, where: Path) -> None:
    """Refuse a shard whose datasets or identity differ from what ``manifest`` describes for ``n_rows`` rows."""
    n_sequences = -(-n_rows // rows_per_batch(manifest)) * int(manifest["batch_size"])
    for name, (shape, dtype) in shard_layout(manifest, n_rows, n_sequences).items():
        if name not in f:
            raise CorruptShard(f"{f.filename} lacks {name!r}: the shard is damaged; harvest again.")
        got = f[name]
        if (got.shape, got.dtype) != (shape, dtype):
            raise ValueError(
                f"{f.filename}: {name} is {got.shape} {got.dtype}, but {where} describes {shape} {dtype}; the "
                "shard does not belong to this harvest (or is damaged): harvest again."
            )
    changed = mismatches(dict(f.attrs), manifest)
    if changed:
        raise ValueError(
            f"{f.filename} was harvested with other arguments than {where} lists ({', '.join(changed)}): "
            "the folder mixes harvests; harvest again."
        )


def mismatches(info: dict, provenance: dict) -> list[str]:
    """The identity fields on which an existing harvest differs from the requested one."""
    return [k for k in IDENTITY if _plain(info.get(k)) != _plain(provenance.get(k))]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------------------------ checking


class Verification(NamedTuple):
    """What ``verify`` found."""

    n_shards: int
    """Shards checked."""
    n_batches: int
    """Committed forward batches whose checksum was recomputed."""
    problems: list[str]
    """One sentence per damaged shard or batch, naming it; empty when every checksum matched."""


def committed_batches(f: h5py.File) -> Iterator[tuple[int, int, int, dict[str, np.ndarray], int, int]]:
    """Each committed batch of an open shard, read back: ``(k, start, stop, rows, checksum now, checksum recorded)``
    with ``rows`` the batch's row datasets by name (``start:stop`` of the shard's rows)."""
    rows, batches = (int(v) for v in f["progress"][()])
    per_batch, B = rows_per_batch(f.attrs), int(f.attrs["batch_size"])
    recorded = f["checksums"][()]
    for k in range(batches):
        start, stop = k * per_batch, min((k + 1) * per_batch, rows)
        arrays = {name: f[name][start:stop] for name in ROW_DATASETS}
        crc = batch_checksum([*arrays.values(), f["sequences"][k * B : (k + 1) * B]])
        yield k, start, stop, arrays, crc, int(recorded[k])


def verify_shard(path: Path) -> tuple[int, list[str]]:
    """Recompute the checksum of every committed batch of a shard: ``(batches checked, problems)``."""
    batches, problems = 0, []
    with open_shard(path) as f:
        for k, start, stop, _, crc, recorded in committed_batches(f):
            batches += 1
            if crc != recorded:
                problems.append(
                    f"{path}: batch {k} (rows {start}-{stop - 1}) has checksum {crc:08x}, but {recorded:08x} "
                    "was recorded when it was written: its bytes changed since; harvest it again."
                )
    return batches, problems


def verify(directory: str | Path) -> Verification:
    """Check every shard a harvest folder's manifest lists against the checksums recorded at harvest time."""
    directory = Path(directory)
    manifest = read_manifest(directory, require_complete=False)
    n_batches, problems = 0, []
    for entry in manifest["shards"]:
        try:
            batches, found = verify_shard(directory / entry["file"])
        except (OSError, ValueError) as err:
            batches, found = 0, [str(err)]
        n_batches += batches
        problems += found
    return Verification(len(manifest["shards"]), n_batches, problems)


# ------------------------------------------------------------------------------------------------ the manifest


def write_manifest(directory: Path, provenance: dict, n_shards: int, *, fsync: bool = True) -> dict:
    """List the finished shards of ``directory`` in ``manifest.json`` (atomically) and return the manifest.

    The shards are listed and the file replaced under the folder lock, so of jobs finishing together the last
    one to write sees every finished shard: no stale ``complete=False``, no mixed JSON.
    """
    with folder_lock(directory):
        shards = []
        for index in range(n_shards):
            path = directory / shard_name(index)
            if path.exists():
                with open_shard(path) as f:
                    shards.append({"file": path.name, "n_rows": int(f.attrs["n_rows"]),
                                   "first_sequence": int(f.attrs["first_sequence"])})  # fmt: skip
        manifest = {
            **{k: _plain(v) for k, v in provenance.items()},
            "n_shards": n_shards,
            "shards": shards,
            "n_written": sum(s["n_rows"] for s in shards),
            "complete": len(shards) == n_shards,
        }
        write_atomically(directory / MANIFEST, json.dumps(manifest, indent=2), fsync=fsync)
    return manifest


def write_atomically(path: Path, text: str, *, fsync: bool = True) -> None:
    """Replace ``path`` by ``text`` through a temporary file of its own: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as out:
            out.write(text)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        sync_directory(path.parent)


def read_manifest(directory: str | Path, *, require_complete: bool = True) -> dict:
    """Validate a harvest folder and return its manifest; every failure is one clear error."""
    directory = Path(directory)
    path = directory / MANIFEST
    if directory.is_file():
        raise ValueError(
            f"{directory} is a file, not a harvest folder (buffers of cltlab format 1 were single .h5 files); "
            "harvest again: a harvest is now a folder of shards with a manifest."
        )
    if not directory.exists():
        raise FileNotFoundError(
            f"No activation buffer at {directory}: harvest one first (notebook 01_harvest or `cltlab harvest`)."
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no {MANIFEST}: not a finished cltlab harvest (run the same harvest again to finish it)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run the harvest again to rewrite it.") from None
    check_format(manifest, path)
    if require_complete and not manifest.get("complete"):
        raise ValueError(
            f"{directory} is an unfinished harvest ({len(manifest['shards'])} of {manifest['n_shards']} shards, "
            f"{manifest['n_written']} of {manifest['n_tokens']} tokens); run the same harvest again to finish it."
        )
    root = directory.resolve()
    for shard in manifest["shards"]:
        name = shard.get("file")
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(
                f"{path} lists the shard {name!r}, which is not a file name in {directory}; refusing to read "
                "outside the folder (the manifest is damaged or not cltlab's)."
            )
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} is listed in {path} but missing.")
        if (directory / name).resolve().parent != root:
            raise ValueError(
                f"{directory / name} is a link to {(directory / name).resolve()}, outside {directory}; refusing "
                "to read outside the folder (copy the shard in instead)."
            )
    return manifest


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (an OS or HDF5 error) says the disk is full."""
    text = str(err)
    return getattr(err, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text


def disk_full_error(directory: Path, need: int) -> OSError:
    free = shutil.disk_usage(directory).free
    return OSError(
        errno.ENOSPC,
        f"The disk holding {directory} is full ({free / 2**20:,.1f} MiB free; a shard needs up to "
        f"{need / 2**20:,.1f} MiB): free some space and run the same harvest again to continue where it stopped.",
    )
