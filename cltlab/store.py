"""The on-disk format of harvested activations: a folder of HDF5 shards and a small JSON manifest.

    activations/
      manifest.json        provenance, the shard list, ``complete``       (written atomically)
      shard-00000.h5       one shard per run of consecutive forward batches
      shard-00001.h5.partial   a shard being written (renamed when finished)

A shard holds, with every dataset contiguous and allocated when the shard is created::

    resid_mid  (n_rows, n_layers, d_model)   float16 / float32 / bfloat16 stored as its uint16 bits
    mlp_out    (n_rows, n_layers, d_model)
    tokens     (n_rows,)        int32   token id of each row
    sequence   (n_rows,)        int64   global index of the row's sequence
    position   (n_rows,)        int32   position in that sequence (0 is BOS, never stored)
    sequences  (n_sequences, seq_len)  int32  the shard's sequences, BOS included (global index = first_sequence + i)
    stats_sum  (2, n_layers, d_model) float64  Σx of resid_mid and mlp_out over every 8th row (see harvest.py)
    stats_sq   (2, n_layers)          float64  Σ‖x‖² over the same rows
    stats_rows ()                     int64    how many rows those sums cover
    progress   (2,)             int64   rows written, forward batches written

Because all space is allocated up front and progress is a dataset overwritten in place, writing a batch never
changes HDF5 metadata: a process killed at any moment (SIGKILL included) leaves a shard that opens, and whose
``progress`` counts only batches whose rows were flushed before it — the resume point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT = "cltlab.activations"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SITES = ("resid_mid", "mlp_out")
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 bits as uint16
# Arguments that must match for two harvests to be the same data (config/version strings excluded).
IDENTITY = (
    "format", "format_version", "model", "corpus", "split", "layer_start", "layer_stop", "d_model", "dtype", "model_dtype",
    "seq_len", "batch_size", "n_tokens", "shard_batches", "tokenizer", "bos_token_id",
)  # fmt: skip


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


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
    L = provenance["layer_stop"] - provenance["layer_start"]
    d, T = provenance["d_model"], provenance["seq_len"]
    f = h5py.File(path, "w")
    for key, value in provenance.items():
        f.attrs[key] = value
    f.attrs.update(shard_index=index, first_batch=first_batch, n_rows=n_rows,
                   first_sequence=first_batch * provenance["batch_size"])  # fmt: skip
    for site in SITES:
        _create(f, site, (n_rows, L, d), STORAGE_DTYPES[provenance["dtype"]])
    _create(f, "tokens", (n_rows,), np.int32)
    _create(f, "sequence", (n_rows,), np.int64)
    _create(f, "position", (n_rows,), np.int32)
    _create(f, "sequences", (n_sequences, T), np.int32)
    _create(f, "stats_sum", (2, L, d), np.float64)
    _create(f, "stats_sq", (2, L), np.float64)
    _create(f, "stats_rows", (), np.int64)
    _create(f, "progress", (2,), np.int64)
    for name in ("stats_sum", "stats_sq", "stats_rows", "progress"):
        f[name][...] = 0
    f.flush()
    return f


def open_shard(path: Path, mode: str = "r") -> h5py.File:
    """Open a shard, turning every way it can be unreadable into one clear error naming the file."""
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 shard (truncated or corrupt?): {err}") from None
    try:
        check_format(dict(f.attrs), path)
        missing = {*SITES, "tokens", "sequence", "position", "sequences", "progress"} - set(f.keys())
        if missing:
            raise ValueError(
                f"{path} lacks {sorted(missing)}: the shard is damaged; delete it and harvest again."
            )
        if f["progress"][0] > f.attrs["n_rows"]:
            raise ValueError(f"{path} claims more rows than it has room for: the shard is damaged.")
    except Exception:
        f.close()
        raise
    return f


def check_format(info: dict, where: Path) -> None:
    if info.get("format") != FORMAT:
        raise ValueError(f"{where} is not a cltlab activation buffer (format {info.get('format')!r}).")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has buffer format version {info.get('format_version')}; this cltlab reads version "
            f"{FORMAT_VERSION}. Harvest it again with this version."
        )


def mismatches(info: dict, provenance: dict) -> list[str]:
    """The identity fields on which an existing harvest differs from the requested one."""
    return [k for k in IDENTITY if _plain(info.get(k)) != _plain(provenance.get(k))]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def write_manifest(directory: Path, provenance: dict, n_shards: int) -> dict:
    """List the finished shards of ``directory`` in ``manifest.json`` (atomically) and return the manifest."""
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
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)
    return manifest


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
    for shard in manifest["shards"]:
        if not (directory / shard["file"]).exists():
            raise FileNotFoundError(f"{directory / shard['file']} is listed in {path} but missing.")
    return manifest
