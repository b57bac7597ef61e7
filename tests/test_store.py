"""The on-disk format: shards allocated up front, progress in place, a manifest of finished shards, clear errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cltlab.shard_writer import create_shard
from cltlab.store import (
    FORMAT,
    FORMAT_VERSION,
    IDENTITY,
    MANIFEST,
    mismatches,
    open_shard,
    read_manifest,
    shard_name,
    write_manifest,
)

L, D, T, B = 2, 8, 6, 3  # layers, d_model, seq_len, sequences per forward batch


def provenance(**changes) -> dict:
    """A harvest's provenance as ``harvest`` records it (tiny sizes, no model needed)."""
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": "toy",
        "corpus": "shakespeare",
        "split": "train",
        "sites": json.dumps(["resid_mid", "mlp_out"]),
        "layer_start": 1,
        "layer_stop": 1 + L,
        "d_model": D,
        "dtype": "float32",
        "model_dtype": "float32",
        "seq_len": T,
        "batch_size": B,
        "n_tokens": 40,
        "shard_batches": 2,
        "tokenizer": "Toy(vocab=10)",
        "bos_token_id": 0,
        "config": "{}",
        "cltlab_version": "0.1.0",
    }
    return {**info, **changes}


def make_shard(directory, index: int, n_rows: int, *, partial: bool = False, **changes):
    path = directory / (shard_name(index) + (".partial" if partial else ""))
    f = create_shard(
        path, provenance(**changes), index=index, first_batch=2 * index, n_rows=n_rows, n_sequences=2 * B
    )
    return path, f


def test_shard_names():
    assert shard_name(0) == "shard-00000.h5" and shard_name(12345) == "shard-12345.h5"


@pytest.mark.parametrize(
    "dtype, stored", [("float32", np.float32), ("float16", np.float16), ("bfloat16", np.uint16)]
)
def test_new_shard_is_allocated_up_front_with_zero_progress(tmp_path, dtype, stored):
    path, f = make_shard(tmp_path, 1, 25, dtype=dtype)
    with f:
        assert tuple(f["progress"][()]) == (0, 0) and not f["checksums"][()].any()
        assert not f["stats_sum"][()].any() and not f["stats_sq"][()].any()
        shapes = {
            "resid_mid": ((25, L, D), stored),
            "mlp_out": ((25, L, D), stored),
            "tokens": ((25,), np.int32),
            "sequence": ((25,), np.int64),
            "position": ((25,), np.int32),
            "sequences": ((2 * B, T), np.int32),
            "checksums": ((2,), np.uint32),
            "stats_sum": ((2, L, D), np.float64),
            "stats_sq": ((2, L), np.float64),
            "stats_rows": ((), np.int64),
            "progress": ((2,), np.int64),
        }
        assert sorted(f) == sorted(shapes)
        for name, (shape, dt) in shapes.items():
            dataset = f[name]
            assert (dataset.shape, dataset.dtype) == (shape, np.dtype(dt)), name
            # Contiguous and allocated at creation: writing a batch later never changes HDF5 metadata.
            assert dataset.chunks is None and dataset.compression is None, name
            assert dataset.id.get_storage_size() == int(np.prod(shape)) * np.dtype(dt).itemsize, name
        attrs = dict(f.attrs)
    for key, value in provenance(dtype=dtype).items():
        assert attrs[key] == value, key
    assert (attrs["shard_index"], attrs["first_batch"], attrs["n_rows"], attrs["first_sequence"]) == (
        1,
        2,
        25,
        2 * B,
    )
    # The file on disk already holds all of the space.
    assert path.stat().st_size >= 2 * 25 * L * D * np.dtype(stored).itemsize


def test_progress_is_overwritten_in_place(tmp_path):
    path, f = make_shard(tmp_path, 0, 10)
    with f:
        f["progress"][...] = (7, 1)
    with open_shard(path) as f:
        assert tuple(f["progress"][()]) == (7, 1)
        assert f["progress"].id.get_storage_size() == 16


def test_write_manifest_lists_only_finished_shards(tmp_path):
    for index, rows in [(0, 12), (2, 5)]:
        make_shard(tmp_path, index, rows)[1].close()
    partial, f = make_shard(tmp_path, 1, 12, partial=True)
    f.close()
    manifest = write_manifest(tmp_path, provenance(), 3)
    assert manifest == json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["shards"] == [
        {"file": "shard-00000.h5", "n_rows": 12, "first_sequence": 0},
        {"file": "shard-00002.h5", "n_rows": 5, "first_sequence": 4 * B},
    ]
    assert (manifest["n_shards"], manifest["n_written"], manifest["complete"]) == (3, 17, False)
    assert manifest["model"] == "toy" and manifest["format_version"] == FORMAT_VERSION
    with pytest.raises(
        ValueError, match=r"is an unfinished harvest \(2 of 3 shards, 17 of 40 tokens\); run the same"
    ):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, require_complete=False) == manifest

    partial.rename(tmp_path / shard_name(1))
    manifest = write_manifest(tmp_path, provenance(), 3)
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert (manifest["n_written"], manifest["complete"]) == (29, True)
    assert read_manifest(tmp_path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, *(shard_name(i) for i in range(3))]


def test_mismatches_names_the_differing_identity_fields():
    assert mismatches(provenance(), provenance(config='{"other": 1}', cltlab_version="9")) == []
    assert mismatches(provenance(), provenance(n_tokens=41, dtype="float16")) == ["dtype", "n_tokens"]
    for key in IDENTITY:
        assert mismatches(provenance(), provenance(**{key: "other"})) == [key]
    # Attributes read back from HDF5 are numpy scalars; they compare as the plain values.
    assert (
        mismatches(
            {k: np.int64(v) if isinstance(v, int) else v for k, v in provenance().items()}, provenance()
        )
        == []
    )


def test_open_shard_errors_name_the_file(tmp_path):
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not HDF5")
    with pytest.raises(
        ValueError, match=r"notes\.h5 is not a readable HDF5 shard \(truncated or corrupt\?\)"
    ):
        open_shard(not_hdf5)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"other\.h5 is not a cltlab activation buffer \(format None\)"):
        open_shard(other)

    path, f = make_shard(tmp_path, 0, 10)
    f.close()
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(
        ValueError,
        match=r"shard-00000\.h5 has buffer format version 2; this cltlab reads version 3 \(version 3 added "
        r"per-batch checksums\)\. Harvest it again",
    ):
        open_shard(path)

    path, f = make_shard(tmp_path, 1, 10)
    with f:
        del f["mlp_out"]
    with pytest.raises(ValueError, match=r"shard-00001\.h5 lacks \['mlp_out'\]: the shard is damaged"):
        open_shard(path)

    path, f = make_shard(tmp_path, 2, 10)
    with f:
        f["progress"][...] = (11, 3)
    with pytest.raises(ValueError, match=r"shard-00002\.h5 claims more rows than it has room for"):
        open_shard(path)


def test_truncated_shard_is_not_readable(tmp_path):
    path, f = make_shard(tmp_path, 0, 200)
    f.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard-00000\.h5 is not a readable HDF5 shard"):
        open_shard(path)
