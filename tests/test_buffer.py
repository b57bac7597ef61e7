"""DiscBuffer: an epoch covers every row once (over workers and ranks), block reads only, one clear error per bad file."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import resource
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
from conftest import BUFFER_SHARD_ROWS

import cltlab.buffer
from cltlab import DiscBuffer
from cltlab.shard_writer import STATS_STRIDE
from cltlab.sites import to_storage, to_torch

BATCH = 64  # 500 rows → 8 batches of 62 or 63 rows


def _keys(resid: torch.Tensor, mlp: torch.Tensor) -> list[bytes]:
    """One hashable key per row: its exact bytes, resid_mid and mlp_out joined."""
    rows = torch.cat([resid.flatten(1), mlp.flatten(1)], 1).contiguous().numpy()
    return [row.tobytes() for row in rows]


def row_keys(resid: torch.Tensor, mlp: torch.Tensor) -> list[bytes]:
    """The sorted keys of the rows: their multiset (keys join both sites, so a row's two sites stay paired)."""
    return sorted(_keys(resid, mlp))


def epoch(buffer: DiscBuffer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch of the buffer in index order, concatenated."""
    batches = [buffer[i] for i in range(len(buffer))]
    return torch.cat([b.resid_mid for b in batches]), torch.cat([b.mlp_out for b in batches])


@pytest.fixture(scope="module")
def all_rows(buffer_path) -> list[bytes]:
    """The keys of every stored row, read in file order shard by shard with plain h5py."""
    resid, mlp = [], []
    for shard in sorted(buffer_path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            resid.append(torch.from_numpy(f["resid_mid"][()]))
            mlp.append(torch.from_numpy(f["mlp_out"][()]))
    keys = row_keys(torch.cat(resid), torch.cat(mlp))
    # Nearly every row is distinct (a token right after BOS has the same activations in every sequence), so
    # comparing multisets of keys checks that each row comes exactly once.
    assert len(keys) == 500 and len(set(keys)) > 490
    return keys


@pytest.fixture
def buffer_copy(tmp_path, buffer_path):
    """A private copy of the session harvest folder that a test may damage."""
    path = tmp_path / "copy"
    shutil.copytree(buffer_path, path)
    return path


def edit_manifest(path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, **changes}))


# ------------------------------------------------------------------------------------------------ reading


def test_shape_and_info(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    assert (buffer.n_tokens, buffer.n_layers, buffer.d_model, buffer.layer_start) == (500, 4, 64, 0)
    assert len(buffer) == 8
    assert buffer.info["model"] == "tiny-gpt2" and buffer.info["dtype"] == "float32"
    assert buffer.info["format_version"] == 3 and buffer.info["complete"] is True
    assert [s["n_rows"] for s in buffer.info["shards"]] == BUFFER_SHARD_ROWS
    config = json.loads(buffer.info["config"])
    assert config["n_tokens"] == 500 and config["seq_len"] == 32 and config["shard_tokens"] == 248
    batch = buffer[0]
    assert batch.resid_mid.shape == batch.mlp_out.shape and batch.resid_mid.shape[1:] == (4, 64)
    assert batch.resid_mid.shape[0] in (62, 63)  # 500 rows in 8 batches
    assert batch.resid_mid.dtype == batch.mlp_out.dtype == torch.float32
    summary = buffer.summary()
    assert "500 tokens" in summary and "layers 0–3" in summary and "d_model 64" in summary
    assert "in 3 shards" in summary and "format v3" in summary
    assert "tiny-gpt2 on shakespeare/train" in summary and repr(buffer) == summary
    buffer.close()


@pytest.mark.parametrize("batch_size", [64, 100, 250, 500])
def test_one_epoch_holds_each_row_once(buffer_path, all_rows, batch_size):
    """500 rows in shards of 248, 248 and 4: batches cross shard and block boundaries."""
    buffer = DiscBuffer(buffer_path, batch_size=batch_size, block_rows=16)
    sizes = [buffer[i].resid_mid.shape[0] for i in range(len(buffer))]
    assert len(buffer) == -(-500 // batch_size) and sum(sizes) == 500
    assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1
    resid, mlp = epoch(buffer)
    # Keys join resid_mid and mlp_out of a row, so this also checks the two stay paired after shuffling.
    assert row_keys(resid, mlp) == all_rows


def test_shuffled_order_differs_from_file_order(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH, block_rows=8)
    resid, mlp = epoch(buffer)
    file_rows = buffer.read(0, 500)
    assert row_keys(resid, mlp) == row_keys(file_rows.resid_mid, file_rows.mlp_out)
    assert not torch.equal(resid, file_rows.resid_mid)
    # The blocks come in a random order, not shard by shard: the first batch holds blocks from several shards.
    where = {key: i for i, key in enumerate(_keys(file_rows.resid_mid, file_rows.mlp_out))}
    batch = buffer[0]
    first = np.array([where[key] for key in _keys(batch.resid_mid, batch.mlp_out)])
    assert len(set(np.searchsorted([248, 496], first, side="right").tolist())) >= 2


def test_batches_are_deterministic_per_seed(buffer_path):
    a = DiscBuffer(buffer_path, batch_size=BATCH, seed=0)
    b = DiscBuffer(buffer_path, batch_size=BATCH, seed=0)
    c = DiscBuffer(buffer_path, batch_size=BATCH, seed=1)
    assert all(torch.equal(a[i].resid_mid, b[i].resid_mid) for i in range(len(a)))
    assert any(not torch.equal(a[i].resid_mid, c[i].resid_mid) for i in range(len(a)))
    assert row_keys(*epoch(a)) == row_keys(*epoch(c))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_an_epoch_into_equal_disjoint_parts(buffer_path, all_rows, world_size):
    ranks = [
        DiscBuffer(buffer_path, batch_size=BATCH, rank=r, world_size=world_size, block_rows=16)
        for r in range(world_size)
    ]
    counts = {len(buffer) for buffer in ranks}
    assert len(counts) == 1  # every rank takes the same number of steps
    sizes = [buffer[i].resid_mid.shape[0] for buffer in ranks for i in range(len(buffer))]
    assert max(sizes) <= BATCH and max(sizes) - min(sizes) <= 1
    parts = [row_keys(*epoch(buffer)) for buffer in ranks]
    # Disjoint and together every row exactly once: the ranks' multisets add up to the file's.
    assert sum((Counter(part) for part in parts), Counter()) == Counter(all_rows)


@pytest.mark.parametrize("world_size", [1, 2])
def test_dataloader_with_workers_returns_every_row_once(buffer_path, all_rows, world_size):
    keys = []
    for rank in range(world_size):
        buffer = DiscBuffer(buffer_path, batch_size=BATCH, rank=rank, world_size=world_size)
        buffer.read(0, 500)  # the parent now holds open HDF5 handles; workers must open their own
        buffer[0]
        loader = torch.utils.data.DataLoader(buffer, batch_size=None, shuffle=True, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(buffer)
        assert all(b.resid_mid.shape[1:] == (4, 64) for b in batches)
        keys += row_keys(torch.cat([b.resid_mid for b in batches]), torch.cat([b.mlp_out for b in batches]))
        buffer.close()
    assert sorted(keys) == all_rows


def test_batches_are_runs_of_whole_blocks(buffer_path):
    """A batch is a few runs of consecutive file rows (shuffled blocks of ``block_rows``), not a gather of rows."""
    file_rows = DiscBuffer(buffer_path, batch_size=BATCH).read(0, 500)
    where = {key: i for i, key in enumerate(_keys(file_rows.resid_mid, file_rows.mlp_out))}
    buffer = DiscBuffer(buffer_path, batch_size=BATCH, block_rows=16)
    for i in range(len(buffer)):
        batch = buffer[i]  # the file row of each of its rows:
        index = np.array([where[key] for key in _keys(batch.resid_mid, batch.mlp_out)])
        runs = 1 + int((np.diff(index) != 1).sum())
        # ≤ 63/16 whole blocks, a partial block at each end, short blocks at shard ends, two rows that share
        # their bytes: a handful of runs, where gathered rows would make one run per row.
        assert runs <= len(index) // 16 + 6, (i, runs)


def test_no_fancy_indexing_on_the_read_path(buffer_path, monkeypatch):
    """``buffer[i]`` never indexes an HDF5 dataset with a list or array of rows (h5py's slow point-by-point path)."""
    buffer = DiscBuffer(buffer_path, batch_size=BATCH, block_rows=16)
    expected = [buffer[i] for i in range(len(buffer))]
    buffer.close()
    selections = []
    original_getitem, original_direct = h5py.Dataset.__getitem__, h5py.Dataset.read_direct

    def getitem(self, args, *rest, **kwargs):
        selections.append((self.name, args))
        return original_getitem(self, args, *rest, **kwargs)

    def read_direct(self, array, source_sel=None, dest_sel=None):
        selections.append((self.name, source_sel))
        return original_direct(self, array, source_sel, dest_sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    monkeypatch.setattr(h5py.Dataset, "read_direct", read_direct)
    for i, batch in enumerate(expected):  # a fresh buffer state: files opened during these reads
        got = buffer[i]
        assert torch.equal(got.resid_mid, batch.resid_mid) and torch.equal(got.mlp_out, batch.mlp_out)

    def fancy(selection) -> bool:
        parts = selection if isinstance(selection, tuple) else (selection,)
        return any(isinstance(p, (list, np.ndarray, torch.Tensor)) for p in parts)

    assert not [(name, sel) for name, sel in selections if fancy(sel)]


def test_index_out_of_range(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    with pytest.raises(IndexError, match="batch 8 out of range for 8 batches"):
        buffer[8]
    with pytest.raises(IndexError):
        buffer[-1]


def test_pickled_buffer_reopens_its_files(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    first = buffer[2]
    assert buffer.n_open > 0
    clone = pickle.loads(pickle.dumps(buffer))
    assert clone.n_open == 0
    assert torch.equal(clone[2].resid_mid, first.resid_mid) and torch.equal(clone[2].mlp_out, first.mlp_out)
    buffer.close()
    assert buffer.n_open == 0


def test_read_crosses_shard_boundaries(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    shards = []
    for shard in sorted(buffer_path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            shards.append(f["mlp_out"][()])
    whole = np.concatenate(shards)
    for start, stop in [(0, 500), (240, 260), (495, 500), (247, 249), (10, 11)]:
        rows = buffer.read(start, stop)
        assert rows.resid_mid.shape == (stop - start, 4, 64)
        assert np.array_equal(rows.mlp_out.numpy(), whole[start:stop])
        inputs = buffer.read_inputs(start, stop)  # resid_mid alone, float32
        assert inputs.dtype == torch.float32 and torch.equal(inputs, rows.resid_mid.float())


def test_input_blocks_read_every_block_across_shards_into_one_tensor(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    whole = buffer.read(0, 500).resid_mid.float()
    starts = [
        0,
        245,
        493,
        100,
    ]  # shards of 248 rows: the second block crosses into the next; the third is cut
    blocks = [
        (start, stop, resid.clone(), resid.data_ptr())
        for start, stop, resid in buffer.input_blocks(starts, 7)
    ]
    assert [(start, stop) for start, stop, *_ in blocks] == [(0, 7), (245, 252), (493, 500), (100, 107)]
    for start, stop, resid, _ in blocks:
        assert resid.dtype == torch.float32 and torch.equal(resid, whole[start:stop])
    assert len({ptr for *_, ptr in blocks}) == 1  # every block was read into the same memory
    cut = list(buffer.input_blocks([96], 7, stop=100))
    assert [(start, stop) for start, stop, _ in cut] == [(96, 100)] and torch.equal(cut[0][2], whole[96:100])
    with pytest.raises(IndexError, match=r"block start 500 out of range for rows \[0, 500\)"):
        list(buffer.input_blocks([500], 7))


def test_stats_equal_mean_and_scale_of_the_rows(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    stats = buffer.stats
    assert [tuple(s.shape) for s in stats] == [(4, 64), (4, 1), (4, 64), (4, 1)]
    # Estimated at harvest time from every 8th row of each shard (cltlab.shard_writer.STATS_STRIDE).
    starts = np.concatenate([[0], np.cumsum([s["n_rows"] for s in buffer.info["shards"]])])
    picked = np.concatenate(
        [np.arange(a, b, STATS_STRIDE) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    )
    whole = buffer.read(0, buffer.n_tokens)
    rows = type(whole)(whole.resid_mid[picked], whole.mlp_out[picked])
    for x, mean, scale in [
        (rows.resid_mid, stats.input_mean, stats.input_scale),
        (rows.mlp_out, stats.output_mean, stats.output_scale),
    ]:
        x = x.double()
        mu = x.mean(0)  # (n_layers, d_model)
        s = ((x - mu).pow(2).sum(-1).mean(0) / x.shape[-1]).sqrt()  # (n_layers,)
        assert torch.allclose(mean.double(), mu, rtol=1e-5, atol=1e-6)
        assert torch.allclose(scale.double()[:, 0], s, rtol=1e-4)


def test_token_info_and_sequences(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    tokens, sequence, position = buffer.token_info(240, 260)  # across the first shard boundary
    assert tokens.shape == sequence.shape == position.shape == (20,)
    all_tokens, all_sequence, all_position = buffer.token_info()
    assert all_tokens.shape == (500,) and np.array_equal(all_tokens[240:260], tokens)
    assert np.array_equal(all_sequence[240:260], sequence) and np.array_equal(all_position[240:260], position)
    sequences = buffer.sequences
    assert sequences.shape == (20, 32)  # 5 forward batches of 4 sequences, in global order over the shards
    assert np.array_equal(sequences[all_sequence, all_position], all_tokens)


def test_context_shows_the_tokens_around_a_row(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    tokens, sequence, position = buffer.token_info()
    sequences = buffer.sequences
    for row in [0, 247, 248, 300, 496, 499]:  # rows of all three shards
        context = buffer.context(row, before=5, after=3)
        seq, pos = int(sequence[row]), int(position[row])
        start = max(1, pos - 5)
        assert context.ids == sequences[seq, start : pos + 4].tolist()
        assert context.index == pos - start and context.ids[context.index] == tokens[row]
    first = int(np.flatnonzero(position == 1)[0])
    assert buffer.context(first, before=8).index == 0  # BOS is never part of a context
    with pytest.raises(IndexError, match="row 500 out of range for 500 rows"):
        buffer.context(500)


def test_check_compatible(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    buffer.check_compatible(4, 64)
    with pytest.raises(
        ValueError,
        match=r"acts holds 4 layers of d_model 64, but the CLT has 3 layers of d_model 64; harvest again",
    ):
        buffer.check_compatible(3, 64)
    with pytest.raises(
        ValueError, match="acts holds 4 layers of d_model 64, but my model has 4 layers of d_model 32"
    ):
        buffer.check_compatible(4, 32, what="my model")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtype_round_trip(dtype):
    x = torch.randn(5, 3, 4)
    stored = to_storage(x, dtype)
    assert (
        stored.numpy().dtype == {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype]
    )
    back = to_torch(stored.numpy(), dtype)
    assert back.dtype == getattr(torch, dtype)
    assert torch.equal(back, x.to(getattr(torch, dtype)))


# ------------------------------------------------------------------------------------------------ bad files


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "acts"
    with pytest.raises(FileNotFoundError, match=r"No activation buffer at .*nowhere/acts: harvest one first"):
        DiscBuffer(missing)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"empty has no manifest\.json: not a finished cltlab harvest"
    ):
        DiscBuffer(tmp_path / "empty")


def test_a_single_file_is_not_a_harvest_folder(tmp_path):
    """A format-v1 buffer was one ``.h5`` file; pointing at one names the file."""
    path = tmp_path / "activations.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises((FileNotFoundError, ValueError), match=r"activations\.h5"):
        DiscBuffer(path)


def test_corrupt_manifest(buffer_copy):
    (buffer_copy / "manifest.json").write_text('{"format": "cltlab.activations", "shards": [')
    with pytest.raises(ValueError, match=r"copy/manifest\.json is not valid JSON .*run the harvest again"):
        DiscBuffer(buffer_copy)


def test_unknown_format_version(buffer_copy):
    edit_manifest(buffer_copy, format_version=4)
    with pytest.raises(
        ValueError, match=r"manifest\.json has buffer format version 4; this cltlab reads version 3"
    ):
        DiscBuffer(buffer_copy)


def test_not_a_cltlab_buffer(buffer_copy):
    edit_manifest(buffer_copy, format="something.else")
    with pytest.raises(
        ValueError, match=r"manifest\.json is not a cltlab activation buffer \(format 'something\.else'\)"
    ):
        DiscBuffer(buffer_copy)


def test_unfinished_harvest(buffer_copy):
    manifest = json.loads((buffer_copy / "manifest.json").read_text())
    edit_manifest(buffer_copy, shards=manifest["shards"][:1], n_written=248, complete=False)
    with pytest.raises(
        ValueError,
        match=r"copy is an unfinished harvest \(1 of 3 shards, 248 of 500 tokens\); run the same harvest again",
    ):
        DiscBuffer(buffer_copy)


def test_listed_shard_is_missing(buffer_copy):
    (buffer_copy / "shard-00001.h5").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"copy/shard-00001\.h5 is listed in .*manifest\.json but missing"
    ):
        DiscBuffer(buffer_copy)


def test_truncated_shard_names_the_file(buffer_copy):
    shard = buffer_copy / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"copy/shard-00001\.h5 is not a readable HDF5 shard \(truncated or corrupt\?\)"
    ):
        DiscBuffer(buffer_copy, batch_size=BATCH).read(0, 500)


def test_shard_with_a_missing_dataset_names_the_file(buffer_copy):
    with h5py.File(buffer_copy / "shard-00000.h5", "r+") as f:
        del f["mlp_out"]
    with pytest.raises(ValueError, match=r"copy/shard-00000\.h5 lacks \['mlp_out'\]: the shard is damaged"):
        DiscBuffer(buffer_copy, batch_size=BATCH).read(0, 500)


def test_fewer_tokens_than_a_batch_per_rank(buffer_path):
    with pytest.raises(ValueError, match="acts holds 500 tokens, fewer than one batch of 1024 per rank"):
        DiscBuffer(buffer_path, batch_size=1024)
    with pytest.raises(ValueError, match="acts holds 500 tokens, fewer than one batch of 200 per rank"):
        DiscBuffer(buffer_path, batch_size=200, rank=1, world_size=3)
    assert len(DiscBuffer(buffer_path, batch_size=250, rank=1, world_size=2)) == 1


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank(buffer_path, rank, world_size):
    with pytest.raises(ValueError, match=rf"rank must be in \[0, world_size={world_size}\), not {rank}\."):
        DiscBuffer(buffer_path, batch_size=BATCH, rank=rank, world_size=world_size)


# ------------------------------------------------------------------------------------------------ file descriptors


def shard_fds(folder) -> int:
    """Descriptors this process holds open on the shards of ``folder``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/shard-")
        except OSError:  # closed meanwhile (another thread, or the listing's own descriptor)
            pass
    return count


def test_a_buffer_keeps_at_most_max_open_shards_open(buffer_copy, monkeypatch):
    reference = DiscBuffer(buffer_copy, batch_size=BATCH, block_rows=16)
    expected = epoch(reference)
    tokens, mean = reference.token_info()[0], reference.stats.input_mean
    reference.close()
    assert shard_fds(buffer_copy) == 0
    buffer = DiscBuffer(buffer_copy, batch_size=BATCH, block_rows=16, max_open=1)  # three shards
    open_while_reading = []
    read_into = cltlab.buffer.read_into

    def counting(fd, array, offset):
        open_while_reading.append(shard_fds(buffer_copy))
        return read_into(fd, array, offset)

    monkeypatch.setattr(cltlab.buffer, "read_into", counting)
    with ThreadPoolExecutor(4) as pool:  # threads reading at once share the descriptors
        batches = list(pool.map(buffer.__getitem__, range(len(buffer))))
    got = torch.cat([b.resid_mid for b in batches]), torch.cat([b.mlp_out for b in batches])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # One descriptor per reading thread at most while they read, then one.
    assert max(open_while_reading) <= 4 and buffer.n_open == shard_fds(buffer_copy) == 1
    assert np.array_equal(buffer.token_info()[0], tokens) and torch.equal(buffer.stats.input_mean, mean)
    assert buffer.n_open == shard_fds(buffer_copy) == 2  # one descriptor, one HDF5 handle
    buffer.close()
    assert buffer.n_open == shard_fds(buffer_copy) == 0


def test_running_out_of_file_descriptors_says_so(buffer_path):
    """With one descriptor left, a buffer limited to one open shard reads every batch; one that needs two files at
    once says it ran out of them (not that a shard is corrupt)."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    buffer = DiscBuffer(buffer_path, batch_size=64, max_open=1)
    free = os.dup(0)
    os.close(free)  # the lowest free descriptor number: the limit makes it the only one
    resource.setrlimit(resource.RLIMIT_NOFILE, (free + 1, limits[1]))
    try:
        rows = sum(buffer[i].resid_mid.shape[0] for i in range(len(buffer)))
        with pytest.raises(OSError) as info:
            buffer.token_info()  # an HDF5 handle beside the open descriptor: two files
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        buffer.close()
    assert rows == 500 and info.value.errno == errno.EMFILE
    assert re.fullmatch(
        r"\[Errno 24\] Too many open files: could not open .*acts/shard-0000\d\.h5; this process may hold \d+ "
        r"\(`ulimit -n`\)\. Raise the limit, or open fewer shards at once \(DiscBuffer\(max_open=\.\.\.\)\)\.",
        str(info.value),
    ), str(info.value)
