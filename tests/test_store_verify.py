"""Checksums of committed batches: ``verify``, ``DiscBuffer(verify=True)`` and ``cltlab verify`` name a damaged
shard and batch; shards are checked against the manifest (shapes, dtypes, identity, staying inside the folder)."""

from __future__ import annotations

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
