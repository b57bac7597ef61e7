"""Checksums of committed batches: ``verify``, ``DiscBuffer(verify=True)`` and ``cltlab verify`` name a damaged
shard and batch; shards are checked against the manifest (shapes, dtypes, identity, staying inside the folder)."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pytest

from cltlab import DiscBuffer
from cltlab.cli import main
from cltlab.store import verify


@pytest.fixture
def copy(tmp_path, buffer_path):
    path = tmp_path / "copy"
    shutil.copytree(buffer_path, path)
    return path


def test_an_intact_harvest_verifies(buffer_path, capsys):
    assert verify(buffer_path) == (3, 5, [])
    assert len(DiscBuffer(buffer_path, batch_size=100, verify=True)) == 5
    assert main(["verify", str(buffer_path)]) == 0
    assert f"{buffer_path}: 3 shards, 5 batches, every checksum matches." in capsys.readouterr().out


def test_a_damaged_batch_is_named(copy, capsys):
    with h5py.File(copy / "shard-00001.h5", "r+") as f:  # one value of shard 1's second batch (rows 124-247)
        f["mlp_out"][130, 2, 5] = np.float32(1.5)
    found = verify(copy)
    assert (found.n_shards, found.n_batches, len(found.problems)) == (3, 5, 1)
    assert re.fullmatch(
        rf"{re.escape(str(copy))}/shard-00001\.h5: batch 1 \(rows 124-247\) has checksum [0-9a-f]{{8}}, but "
        r"[0-9a-f]{8} was recorded when it was written: its bytes changed since; harvest it again\.",
        found.problems[0],
    ), found.problems[0]
    with pytest.raises(
        ValueError,
        match=r"copy failed verification \(1 damaged batches\):\n  .*shard-00001\.h5: batch 1 \(rows",
    ):
        DiscBuffer(copy, batch_size=100, verify=True)
    DiscBuffer(copy, batch_size=100)  # without verify=True the folder opens (the check reads every byte)
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "shard-00001.h5: batch 1 (rows 124-247)" in out and "1 damaged" in out


def test_rows_zeroed_after_a_crash_are_found(copy):
    """What a lost write reads back as: zeros where a committed batch was."""
    with h5py.File(copy / "shard-00000.h5", "r+") as f:
        f["resid_mid"][0:124] = 0
    assert [p.split(": ")[1].split(" has")[0] for p in verify(copy).problems] == ["batch 0 (rows 0-123)"]


# ------------------------------------------------------------------------------------------------ shards vs manifest


def edit_manifest(path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_shapes_differing_from_the_manifest_are_refused(copy):
    edit_manifest(copy, d_model=32)
    with pytest.raises(
        ValueError,
        match=r"copy/shard-00000\.h5: resid_mid is \(248, 4, 64\) float32, but .*copy/manifest\.json describes "
        r"\(248, 4, 32\) float32; the shard does not belong to this harvest \(or is damaged\): harvest again\.",
    ):
        DiscBuffer(copy, batch_size=100)


def test_dtypes_differing_from_the_manifest_are_refused(copy):
    with h5py.File(copy / "shard-00001.h5", "r+") as f:
        tokens = f["tokens"][()]
        del f["tokens"]
        f["tokens"] = tokens.astype(np.int64)
    with pytest.raises(
        ValueError,
        match=r"shard-00001\.h5: tokens is \(248,\) int64, but .*manifest\.json describes \(248,\) int32",
    ):
        DiscBuffer(copy, batch_size=100)


def test_a_shard_of_another_harvest_is_refused(copy):
    with h5py.File(copy / "shard-00002.h5", "r+") as f:
        f.attrs["corpus"] = "bible"
    with pytest.raises(
        ValueError,
        match=r"shard-00002\.h5 was harvested with other arguments than .*manifest\.json lists \(corpus\)",
    ):
        DiscBuffer(copy, batch_size=100)


@pytest.mark.parametrize("name", ["../outside.h5", "ABSOLUTE", "sub/shard-00000.h5", ".."])
def test_manifest_entries_outside_the_folder_are_refused(copy, tmp_path, name):
    (copy / "sub").mkdir()
    shutil.copy(copy / "shard-00000.h5", copy / "sub" / "shard-00000.h5")
    shutil.copy(copy / "shard-00000.h5", tmp_path / "outside.h5")
    name = str(tmp_path / "outside.h5") if name == "ABSOLUTE" else name
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError,
        match=rf"manifest\.json lists the shard '{re.escape(name)}', which is not a file name in .*copy; refusing "
        r"to read outside the folder",
    ):
        DiscBuffer(copy, batch_size=100)


def test_a_shard_linked_from_outside_the_folder_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.h5"
    (copy / "shard-00001.h5").rename(outside)
    (copy / "shard-00001.h5").symlink_to(outside)
    with pytest.raises(
        ValueError,
        match=r"copy/shard-00001\.h5 is a link to .*elsewhere\.h5, outside .*copy; refusing to read",
    ):
        DiscBuffer(copy, batch_size=100)
    (copy / "shard-00001.h5").unlink()
    (copy / "shard-00001.h5").symlink_to(copy / "shard-00001.h5.moved")  # a link within the folder is fine
    outside.rename(copy / "shard-00001.h5.moved")
    assert len(DiscBuffer(copy, batch_size=100)) == 5
