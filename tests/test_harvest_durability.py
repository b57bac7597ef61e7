"""Harvest durability: each batch reaches the disk before its progress, a full disk is one clear error and a resume
after it equals an uninterrupted run, a damaged committed batch is written again, a shard is deleted only when
proven damaged, float16 refuses overflow."""

from __future__ import annotations

import errno
import importlib
import os
import re
import subprocess
import sys

import h5py
import pytest
from conftest import BUFFER_CONFIG
from test_harvest import differences

from cltlab import harvest
from cltlab.config import HarvestConfig
from cltlab.store import ROW_DATASETS, open_shard


def fail_at_batch(monkeypatch, batch: int, error: Exception) -> None:
    """Make the harvest's write of forward batch ``batch`` (0-based, counted over the run) raise ``error``."""
    write_direct, seen = h5py.Dataset.write_direct, []

    def failing(self, array, source_sel=None, dest_sel=None):
        if self.name == "/mlp_out":
            seen.append(1)
            if len(seen) == batch + 1:
                raise error
        return write_direct(self, array, source_sel, dest_sel)

    monkeypatch.setattr(h5py.Dataset, "write_direct", failing)


def stopped_harvest(monkeypatch, batch: int, error: Exception, config, folder, model) -> None:
    """A harvest into ``folder`` stopped by ``error`` at forward batch ``batch``; then the failure is lifted."""
    fail_at_batch(monkeypatch, batch, error)
    with pytest.raises(type(error), match=str(error)):
        harvest(config, folder, model=model, progress=False)
    monkeypatch.undo()


# What HDF5 raises when a write finds the disk full.
ENOSPC = OSError(
    "Can't synchronously write data (file write failed: time = Tue Dec  1 12:00:00 2026, filename = 'x', "
    "file descriptor = 7, errno = 28, error message = 'No space left on device', buf = 0x1, total write size = 8)"
)


def test_disk_full_is_one_clear_error_and_a_resume_equals_an_uninterrupted_run(
    tmp_path, buffer_path, harvest_config, tiny_gpt2, monkeypatch
):
    folder = tmp_path / "acts"
    fail_at_batch(monkeypatch, 3, ENOSPC)  # shard 1's second batch (two batches per shard)
    with pytest.raises(OSError) as info:
        harvest(harvest_config, folder, model=tiny_gpt2, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"\[Errno 28\] The disk holding {re.escape(str(folder))} is full \([\d,.]+ MiB free; a shard needs up "
        r"to [\d,.]+ MiB\): free some space and run the same harvest again to continue where it stopped\.",
        str(info.value),
    ), str(info.value)
    names = sorted(p.name for p in folder.iterdir())
    assert names[:2] == ["shard-00000.h5", "shard-00001.h5.partial"]
    assert names[2:] in ([], ["shard-00002.h5.partial"])  # the next shard may have been created meanwhile
    with open_shard(folder / "shard-00001.h5.partial") as f:
        assert tuple(f["progress"][()]) == (124, 1)  # the batch before the full disk stands
    monkeypatch.undo()  # space was freed
    result = harvest(harvest_config, folder, model=tiny_gpt2, progress=False)
    assert result.complete and result.n_tokens == 500
    assert differences(folder, buffer_path) == []


def test_a_committed_batch_whose_rows_were_lost_is_written_again(
    tmp_path, buffer_path, harvest_config, tiny_gpt2, monkeypatch
):
    """Power lost without the syncs: the progress survived but the batch's rows read back as zeros."""
    folder = tmp_path / "acts"
    stopped_harvest(monkeypatch, 3, RuntimeError("the machine lost power"), harvest_config, folder, tiny_gpt2)
    with h5py.File(folder / "shard-00001.h5.partial", "r+") as f:
        assert tuple(f["progress"][()]) == (124, 1)
        f["resid_mid"][100:124] = 0
    result = harvest(harvest_config, folder, model=tiny_gpt2, progress=False)
    assert result.complete and result.n_tokens == 500
    assert differences(folder, buffer_path) == []


def test_each_batch_reaches_the_disk_before_its_progress(tmp_path, harvest_config, tiny_gpt2, monkeypatch):
    """The order of writes, syncs, progress updates and renames a harvest issues, file by file."""
    folder = tmp_path / "acts"
    events: list[tuple[str, str]] = []  # (what, file name)
    setitem, write_direct = h5py.Dataset.__setitem__, h5py.Dataset.write_direct
    fdatasync, fsync, replace = os.fdatasync, os.fsync, os.replace

    def name_of(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def recording_setitem(self, key, value):
        setitem(self, key, value)
        if self.name == "/progress":
            events.append(("p", os.path.basename(self.file.filename)))

    def recording_write_direct(self, array, source_sel=None, dest_sel=None):
        write_direct(self, array, source_sel, dest_sel)
        if self.name.lstrip("/") in ROW_DATASETS:
            events.append(("r", os.path.basename(self.file.filename)))

    def recording(kind, function):
        def call(fd):
            events.append((kind, name_of(fd)))
            return function(fd)

        return call

    def recording_replace(src, dst, **kwargs):
        replace(src, dst, **kwargs)
        events.append(("n", os.path.basename(src)))

    monkeypatch.setattr(h5py.Dataset, "__setitem__", recording_setitem)
    monkeypatch.setattr(h5py.Dataset, "write_direct", recording_write_direct)
    monkeypatch.setattr(os, "fdatasync", recording("s", fdatasync))
    monkeypatch.setattr(os, "fsync", recording("s", fsync))
    monkeypatch.setattr(os, "replace", recording_replace)
    harvest(harvest_config, folder, model=tiny_gpt2, progress=False)
    monkeypatch.undo()

    def story(name: str) -> str:
        return "".join(kind for kind, file in events if file == name)

    # Created with zero progress; each batch: its rows, a sync, then its progress; at the end a sync and the rename.
    for shard, batches in [(0, 2), (1, 2), (2, 1)]:
        assert story(f"shard-{shard:05d}.h5.partial") == "p" + "rrrrrsp" * batches + "sn", shard
    # Every rename is followed by a sync of the folder before anything else happens to the files.
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "n"]
    assert len(renamed) == 4  # three shards and the manifest
    assert all(events[i + 1] == ("s", folder.name) for i in renamed)
    manifest_tmp = events[renamed[-1]][1]
    assert manifest_tmp.startswith(".manifest.json.") and story(manifest_tmp) == "sn"


def test_float16_storage_refuses_values_beyond_its_range(tmp_path, tiny_gpt2, monkeypatch):
    module = importlib.import_module("cltlab.harvest")
    trace, calls = module.trace_layers, []

    def overflowing(model, ids, *args, **kwargs):
        resid, mlp, logits = trace(model, ids, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # forward batch 1: layer 2's MLP output grows past float16's largest value
            mlp[2] = mlp[2] * 1e9
        return resid, mlp, logits

    monkeypatch.setattr(module, "trace_layers", overflowing)
    config = HarvestConfig(**{**BUFFER_CONFIG, "dtype": "float16"})
    folder = tmp_path / "acts"
    with pytest.raises(
        ValueError,
        match=r"^mlp_out of layer 2 holds values beyond float16's range \(±65504\) in forward batch 1; float16 "
        r"would store them as inf\. Harvest with dtype='bfloat16' \(same size, float32's range\) or 'float32'",
    ):
        harvest(config, folder, model=tiny_gpt2, progress=False)
    with open_shard(folder / "shard-00000.h5.partial") as f:
        assert tuple(f["progress"][()]) == (124, 1)  # nothing of batch 1 was committed


def test_a_partial_shard_open_in_another_process_is_not_deleted(
    tmp_path, buffer_path, harvest_config, tiny_gpt2, monkeypatch
):
    """Only a shard proven damaged is started again: one HDF5 cannot lock (a reader elsewhere) is left alone."""
    folder = tmp_path / "acts"
    stopped_harvest(monkeypatch, 1, RuntimeError("stopped"), harvest_config, folder, tiny_gpt2)
    partial = folder / "shard-00000.h5.partial"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(partial)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "open\n"
        before = partial.read_bytes()  # as the holder left it (opening marks the file open for writing)
        with pytest.raises(
            BlockingIOError, match=r"shard-00000\.h5\.partial is open for writing in another process"
        ):
            harvest(harvest_config, folder, model=tiny_gpt2, progress=False)
        assert partial.read_bytes() == before
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert harvest(harvest_config, folder, model=tiny_gpt2, progress=False).complete
    assert differences(folder, buffer_path) == []


# Opens a shard for writing (HDF5 locks it) and keeps it open until stdin closes.
HOLD = "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); sys.stdin.read()"
