"""DiscBuffer: batches cover the file's rows, shuffling, DataLoader workers, and one clear error per bad file."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from cltlab import DiscBuffer
from cltlab.buffer import read_info, to_storage, to_torch

BATCH = 64  # 500 rows → 7 batches, the last 52 rows dropped


def row_keys(resid: torch.Tensor, mlp: torch.Tensor) -> list[bytes]:
    """One hashable key per row (its exact bytes), sorted: the multiset of rows."""
    rows = torch.cat([resid.flatten(1), mlp.flatten(1)], 1).contiguous().numpy()
    return sorted(row.tobytes() for row in rows)


@pytest.fixture
def buffer_copy(tmp_path, buffer_path):
    """A private copy of the session buffer that a test may damage."""
    path = tmp_path / "copy.h5"
    shutil.copy(buffer_path, path)
    return path


def test_shape_and_info(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    assert (buffer.n_tokens, buffer.n_layers, buffer.d_model, buffer.layer_start) == (500, 4, 64, 0)
    assert len(buffer) == 7
    assert buffer.info["model"] == "tiny-gpt2" and buffer.info["dtype"] == "float32"
    assert buffer.info["config"]["n_tokens"] == 500 and buffer.info["config"]["seq_len"] == 32
    batch = buffer[0]
    assert batch.resid_mid.shape == batch.mlp_out.shape == (BATCH, 4, 64)
    assert batch.resid_mid.dtype == torch.float32
    summary = buffer.summary()
    assert "500 tokens" in summary and "layers 0–3" in summary and "d_model 64" in summary
    assert "tiny-gpt2 on shakespeare/train" in summary and repr(buffer) == summary
    buffer.close()


def test_one_epoch_holds_each_row_once(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    batches = [buffer[i] for i in range(len(buffer))]
    resid = torch.cat([b.resid_mid for b in batches])
    mlp = torch.cat([b.mlp_out for b in batches])
    file_rows = buffer.read(0, len(buffer) * BATCH)
    # Keys join resid_mid and mlp_out of a row, so this also checks the two stay paired after shuffling.
    assert row_keys(resid, mlp) == row_keys(file_rows.resid_mid, file_rows.mlp_out)
    # Shuffled: not the file order.
    assert not torch.equal(resid, file_rows.resid_mid)


def test_batches_are_deterministic_per_seed(buffer_path):
    a = DiscBuffer(buffer_path, batch_size=BATCH, seed=0)
    b = DiscBuffer(buffer_path, batch_size=BATCH, seed=0)
    c = DiscBuffer(buffer_path, batch_size=BATCH, seed=1)
    assert torch.equal(a[3].resid_mid, b[3].resid_mid)
    assert not torch.equal(a[3].resid_mid, c[3].resid_mid)
    assert row_keys(*a[3]) == row_keys(*c[3])


def test_index_out_of_range(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    with pytest.raises(IndexError, match="batch 7 out of range for 7 batches"):
        buffer[7]
    with pytest.raises(IndexError):
        buffer[-1]


def test_dataloader_with_workers_returns_the_same_rows(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    expected = buffer.read(0, len(buffer) * BATCH)  # the parent now holds an open h5py handle
    loader = torch.utils.data.DataLoader(buffer, batch_size=None, shuffle=True, num_workers=2)
    batches = list(loader)
    assert len(batches) == 7
    assert all(b.resid_mid.shape == (BATCH, 4, 64) for b in batches)
    resid = torch.cat([b.resid_mid for b in batches])
    mlp = torch.cat([b.mlp_out for b in batches])
    assert row_keys(resid, mlp) == row_keys(expected.resid_mid, expected.mlp_out)


def test_pickled_buffer_reopens_its_file(buffer_path):
    import pickle

    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    first = buffer[2]
    clone = pickle.loads(pickle.dumps(buffer))
    assert clone._file is None
    assert torch.equal(clone[2].resid_mid, first.resid_mid)


def test_stats_equal_mean_and_scale_of_the_rows(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    stats = buffer.stats
    assert [tuple(s.shape) for s in stats] == [(4, 64), (4, 1), (4, 64), (4, 1)]
    rows = buffer.read(0, buffer.n_tokens)
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
    tokens, sequence, position = buffer.token_info(10, 20)
    assert tokens.shape == sequence.shape == position.shape == (10,)
    all_tokens = buffer.token_info()[0]
    assert all_tokens.shape == (500,) and np.array_equal(all_tokens[10:20], tokens)
    assert buffer.sequences.shape[1] == 32


def test_check_compatible(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=BATCH)
    buffer.check_compatible(4, 64)
    with pytest.raises(
        ValueError,
        match=r"acts\.h5 holds 4 layers of d_model 64, but the CLT has 3 layers of "
        r"d_model 64; harvest again",
    ):
        buffer.check_compatible(3, 64)
    with pytest.raises(ValueError, match="but my model has 4 layers of d_model 32"):
        buffer.check_compatible(4, 32, what="my model")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "acts.h5"
    with pytest.raises(
        FileNotFoundError, match=r"No activation buffer at .*nowhere/acts\.h5: harvest one first"
    ):
        DiscBuffer(missing)


def test_not_hdf5_names_the_file(tmp_path):
    path = tmp_path / "plain.h5"
    path.write_text("this is not HDF5")
    with pytest.raises(ValueError, match=r"plain\.h5 is not a readable HDF5 file \(truncated or corrupt\?\)"):
        DiscBuffer(path)


def test_truncated_file_names_the_file(tmp_path, buffer_path):
    path = tmp_path / "truncated.h5"
    data = buffer_path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"truncated\.h5 is not a readable HDF5 file"):
        DiscBuffer(path)


def test_wrong_format_version(buffer_copy):
    with h5py.File(buffer_copy, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(
        ValueError, match=r"copy\.h5 has buffer format version 2; this cltlab reads version 1"
    ):
        DiscBuffer(buffer_copy)


def test_not_a_cltlab_buffer(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"other\.h5 is not a cltlab activation buffer \(format None\)"):
        DiscBuffer(path)


def test_unfinished_harvest(buffer_copy):
    with h5py.File(buffer_copy, "r+") as f:
        f.attrs["complete"] = False
        f.attrs["n_written"] = 124
    with pytest.raises(
        ValueError,
        match=r"copy\.h5 is an unfinished harvest \(124 of 500 tokens\); run the same "
        r"harvest again",
    ):
        DiscBuffer(buffer_copy)
    assert read_info(buffer_copy, require_complete=False)["n_written"] == 124


def test_missing_dataset(buffer_copy):
    with h5py.File(buffer_copy, "r+") as f:
        del f["mlp_out"]
    with pytest.raises(ValueError, match=r"copy\.h5 lacks \['mlp_out'\]: the file is damaged"):
        DiscBuffer(buffer_copy)


def test_fewer_tokens_than_a_batch(buffer_path):
    with pytest.raises(ValueError, match="holds 500 tokens, fewer than one batch of 1024"):
        DiscBuffer(buffer_path, batch_size=1024)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtype_round_trip(dtype):
    x = torch.randn(5, 3, 4)
    stored = to_storage(x, dtype)
    assert stored.dtype == {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype]
    back = to_torch(stored, dtype)
    assert back.dtype == getattr(torch, dtype)
    assert torch.equal(back, x.to(getattr(torch, dtype)))
