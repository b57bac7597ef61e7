"""Harvest: what nnsight stores equals plain PyTorch hooks; provenance, reuse and refusal of existing files."""

from __future__ import annotations

import itertools
import shutil

import h5py
import numpy as np
import pytest
import torch
from helpers import hooked_sites, random_ids

from cltlab import DiscBuffer, HarvestConfig, harvest
from cltlab.corpus import token_sequences
from cltlab.harvest import trace_sites
from cltlab.models import LoadedModel


def harvested_sequences(model: LoadedModel, config: HarvestConfig, n_sequences: int) -> torch.Tensor:
    """The first ``n_sequences`` sequences the harvest reads, rebuilt from the corpus."""
    batches = token_sequences(
        config.corpus,
        model.tokenizer,
        seq_len=config.seq_len,
        bos_token_id=model.bos_token_id,
        split=config.split,
        batch_size=config.batch_size,
    )
    n_batches = -(-n_sequences // config.batch_size)
    return torch.cat(list(itertools.islice(batches, n_batches)))


def test_file_layout_and_provenance(buffer_path, harvest_config, tiny_gpt2):
    with h5py.File(buffer_path, "r") as f:
        attrs = dict(f.attrs)
        assert f["resid_mid"].shape == f["mlp_out"].shape == (500, 4, 64)
        assert f["resid_mid"].dtype == np.float32
        assert f["tokens"].shape == f["sequence"].shape == f["position"].shape == (500,)
        assert f["sequences"].shape[1] == 32
        assert sorted(f["stats"]) == ["input_mean", "input_scale", "output_mean", "output_scale"]
        positions = f["position"][()]
    assert attrs["format"] == "cltlab.activations" and attrs["format_version"] == 1
    assert attrs["model"] == "tiny-gpt2" and attrs["corpus"] == "shakespeare" and attrs["split"] == "train"
    assert (attrs["layer_start"], attrs["layer_stop"], attrs["d_model"]) == (0, 4, 64)
    assert attrs["n_written"] == attrs["n_tokens"] == 500 and bool(attrs["complete"])
    assert attrs["bos_token_id"] == tiny_gpt2.bos_token_id and attrs["seq_len"] == 32
    # BOS (position 0) is never stored.
    assert positions.min() == 1 and positions.max() == 31


def test_harvest_equals_plain_forward_hooks(buffer_path, harvest_config, tiny_gpt2):
    with h5py.File(buffer_path, "r") as f:
        resid, mlp = f["resid_mid"][()], f["mlp_out"][()]
        tokens, sequence, position = f["tokens"][()], f["sequence"][()], f["position"][()]
    ids = harvested_sequences(tiny_gpt2, harvest_config, int(sequence.max()) + 1)
    hooked_resid, hooked_mlp = hooked_sites(tiny_gpt2, ids, range(4))  # (n_sequences, 32, 4, 64)
    assert np.array_equal(tokens, ids[sequence, position].numpy())
    assert np.array_equal(resid, hooked_resid[sequence, position].numpy())
    assert np.array_equal(mlp, hooked_mlp[sequence, position].numpy())
    # Each (sequence, position) is stored at most once.
    assert len(set(zip(sequence.tolist(), position.tolist(), strict=True))) == 500


def test_rows_point_into_the_stored_sequences(buffer_path):
    """Every row's ``sequence`` index must name a row of the file's ``sequences``, with the row's token there."""
    with h5py.File(buffer_path, "r") as f:
        tokens, sequence, position = f["tokens"][()], f["sequence"][()], f["position"][()]
        sequences = f["sequences"][()]
    out_of_range = sorted(set(sequence[sequence >= len(sequences)].tolist()))
    assert not out_of_range, (
        f"rows reference sequences {out_of_range} but the file stores only {len(sequences)} sequences"
    )
    assert np.array_equal(sequences[sequence, position], tokens)


def test_stored_sequences_are_the_harvested_ones(buffer_path, harvest_config, tiny_gpt2):
    with h5py.File(buffer_path, "r") as f:
        sequences = f["sequences"][()]
    ids = harvested_sequences(tiny_gpt2, harvest_config, len(sequences))
    assert np.array_equal(sequences, ids[: len(sequences)].numpy())
    assert (sequences[:, 0] == tiny_gpt2.bos_token_id).all()


def test_rows_are_shuffled_within_forward_batches(buffer_path):
    with h5py.File(buffer_path, "r") as f:
        sequence, position = f["sequence"][()], f["position"][()]
    file_order = sequence * 32 + position
    assert not np.array_equal(file_order, np.sort(file_order))
    # ...but only within a forward batch of 4 sequences (124 rows): the first block holds sequences 0-3.
    assert set(sequence[:124].tolist()) == {0, 1, 2, 3}


def test_normalization_stats_match_the_rows(buffer_path):
    with h5py.File(buffer_path, "r") as f:
        for site, prefix in [("resid_mid", "input"), ("mlp_out", "output")]:
            rows = torch.from_numpy(f[site][()]).double()  # (n_tokens, n_layers, d_model)
            mean = rows.mean(0)
            scale = ((rows - mean).pow(2).sum(-1).mean(0) / rows.shape[-1]).sqrt()  # (n_layers,)
            assert np.allclose(f["stats"][f"{prefix}_mean"][()], mean.numpy(), rtol=1e-5, atol=1e-6)
            assert f["stats"][f"{prefix}_scale"].shape == (4, 1)
            assert np.allclose(f["stats"][f"{prefix}_scale"][()][:, 0], scale.numpy(), rtol=1e-4)


def test_trace_sites_equals_hooks_on_llama(tiny_llama):
    ids = random_ids(tiny_llama, 3, 12)
    acts = trace_sites(tiny_llama, ids, 0, 3)
    resid, mlp = hooked_sites(tiny_llama, ids, range(3))
    assert acts.resid_mid.shape == acts.mlp_out.shape == (3, 12, 3, 32)
    assert torch.equal(acts.resid_mid, resid)
    assert torch.equal(acts.mlp_out, mlp)


def test_trace_sites_layer_range_on_gpt2(tiny_gpt2):
    ids = random_ids(tiny_gpt2, 2, 10)
    acts = trace_sites(tiny_gpt2, ids, 1, 3)
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(1, 3))
    assert acts.resid_mid.shape == (2, 10, 2, 64)
    assert torch.equal(acts.resid_mid, resid) and torch.equal(acts.mlp_out, mlp)


def test_layer_sub_range_harvest(tmp_path, buffer_path, harvest_config, tiny_gpt2):
    config = HarvestConfig(**{**vars(harvest_config), "layers": (1, 3)})
    result = harvest(config, tmp_path / "sub.h5", model=tiny_gpt2, progress=False)
    buffer = DiscBuffer(result.path, batch_size=100)
    assert (buffer.layer_start, buffer.n_layers, buffer.d_model, buffer.n_tokens) == (1, 2, 64, 500)
    full = DiscBuffer(buffer_path, batch_size=100)
    # Same corpus, same shuffle: the same rows, restricted to layers 1 and 2.
    assert np.array_equal(buffer.token_info()[1], full.token_info()[1])
    sub, whole = buffer.read(0, 500), full.read(0, 500)
    assert torch.equal(sub.resid_mid, whole.resid_mid[:, 1:3])
    assert torch.equal(sub.mlp_out, whole.mlp_out[:, 1:3])
    for a, b in zip(buffer.stats, full.stats, strict=True):
        assert torch.allclose(a, b[1:3], rtol=1e-6)


def test_bfloat16_storage_round_trips(tmp_path, tiny_gpt2):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, dtype="bfloat16")
    result = harvest(config, tmp_path / "bf16.h5", model=tiny_gpt2, progress=False)
    buffer = DiscBuffer(result.path, batch_size=62)
    rows = buffer.read(0, 62)
    assert rows.resid_mid.dtype == torch.bfloat16
    tokens, sequence, position = buffer.token_info()
    ids = torch.from_numpy(buffer.sequences).long()
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(4))
    assert torch.equal(rows.resid_mid, resid[sequence, position].to(torch.bfloat16))
    assert torch.equal(rows.mlp_out, mlp[sequence, position].to(torch.bfloat16))


def test_finished_harvest_is_reused(tmp_path, tiny_gpt2):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, dtype="float32")
    path = tmp_path / "small.h5"
    first = harvest(config, path, model=tiny_gpt2, progress=False)
    assert not first.reused and first.seconds > 0 and first.tokens_per_second > 0
    before = path.read_bytes()
    again = harvest(config, path, model=tiny_gpt2, progress=False)
    assert again.reused and again.n_tokens == 62 and again.seconds == 0.0
    assert path.read_bytes() == before


def test_unfinished_harvest_is_redone(tmp_path, tiny_gpt2):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, dtype="float32")
    path = tmp_path / "small.h5"
    harvest(config, path, model=tiny_gpt2, progress=False)
    with h5py.File(path, "r+") as f:
        expected = f["resid_mid"][()]
        f.attrs["complete"] = False
        f.attrs["n_written"] = 31
        f["resid_mid"][31:] = 0
    result = harvest(config, path, model=tiny_gpt2, progress=False)
    assert not result.reused
    with h5py.File(path, "r") as f:
        assert bool(f.attrs["complete"]) and f.attrs["n_written"] == 62
        assert np.array_equal(f["resid_mid"][()], expected)


def test_existing_file_with_other_arguments_is_refused_and_untouched(tmp_path, buffer_path, tiny_gpt2):
    path = tmp_path / "acts.h5"
    shutil.copy(buffer_path, path)
    before = path.read_bytes()
    other = HarvestConfig(model="tiny-gpt2", n_tokens=400, seq_len=16, batch_size=4, dtype="float32")
    with pytest.raises(
        ValueError,
        match=r"acts\.h5 was harvested with different arguments \(.*\); delete it or choose another path",
    ) as excinfo:
        harvest(other, path, model=tiny_gpt2, progress=False)
    changed = str(excinfo.value).split("(")[1].split(")")[0].split(", ")
    assert sorted(changed) == ["n_tokens", "seq_len"]  # exactly the arguments that differ
    assert path.read_bytes() == before
    sub_range = HarvestConfig(
        model="tiny-gpt2", n_tokens=500, seq_len=32, batch_size=4, dtype="float32", layers=(0, 2)
    )
    with pytest.raises(ValueError, match=r"different arguments \(layer_stop\)"):
        harvest(sub_range, path, model=tiny_gpt2, progress=False)
    assert path.read_bytes() == before


def test_existing_file_that_is_not_hdf5_is_refused_and_untouched(tmp_path, harvest_config, tiny_gpt2):
    path = tmp_path / "notes.h5"
    path.write_text("my notes, not activations")
    with pytest.raises(ValueError, match=r"notes\.h5 is not a readable HDF5 file"):
        harvest(harvest_config, path, model=tiny_gpt2, progress=False)
    assert path.read_text() == "my notes, not activations"


def test_layers_beyond_the_model_are_refused(tmp_path, tiny_gpt2):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, layers=(2, 6))
    with pytest.raises(ValueError, match=r"layers \(2, 6\) exceed the 4 layers of 'tiny-gpt2'"):
        harvest(config, tmp_path / "x.h5", model=tiny_gpt2, progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_corpus_too_small_is_a_clear_error(tmp_path, tiny_gpt2):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(f"a short document number {i}" for i in range(9)))
    config = HarvestConfig(model="tiny-gpt2", corpus=str(corpus), n_tokens=1000, seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match=r"ran out after \d+ of 1000 tokens; ask for fewer"):
        harvest(config, tmp_path / "x.h5", model=tiny_gpt2, progress=False)


def test_harvest_a_llama_model(tmp_path, tiny_llama):
    config = HarvestConfig(model="tiny-llama", n_tokens=45, seq_len=16, batch_size=3, dtype="float32")
    result = harvest(config, tmp_path / "llama.h5", model=tiny_llama, progress=False)
    buffer = DiscBuffer(result.path, batch_size=45)
    assert (buffer.n_layers, buffer.d_model, buffer.n_tokens) == (3, 32, 45)
    tokens, sequence, position = buffer.token_info()
    ids = harvested_sequences(tiny_llama, config, 3)
    resid, mlp = hooked_sites(tiny_llama, ids, range(3))
    rows = buffer.read(0, 45)
    assert torch.equal(rows.resid_mid, resid[sequence, position])
    assert torch.equal(rows.mlp_out, mlp[sequence, position])
