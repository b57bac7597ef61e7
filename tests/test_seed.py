"""Importing the seed project's activation files and checkpoints: exact data, exact reconstructions."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from cltlab import DiscBuffer
from cltlab.cli import main
from cltlab.seed import import_seed_activations, import_seed_checkpoint
from cltlab.shard_writer import ShardWriter

N, L, D, F = 1000, 3, 8, 16


def seed_file(path, n: int = N, seed: int = 0):
    """A seed activation file: ``tensor`` (n, 2, L, D) float32, MLP inputs then outputs."""
    data = np.random.default_rng(seed).normal(size=(n, 2, L, D)).astype(np.float32)
    data[:, 1] = data[:, 1] * 3 + 1  # outputs on another scale
    with h5py.File(path, "w") as f:
        f["tensor"] = data
    return data


def all_rows(folder) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    buffer = DiscBuffer(folder, batch_size=1)
    batch = buffer.read(0, buffer.n_tokens)
    sequence = buffer._gather("sequence", 0, buffer.n_tokens)
    buffer.close()
    return batch.resid_mid.float().numpy(), batch.mlp_out.float().numpy(), sequence


def test_seed_activations_become_a_disc_buffer_row_for_row(tmp_path):
    data = seed_file(tmp_path / "seed.h5")
    out = import_seed_activations(
        tmp_path / "seed.h5", tmp_path / "acts", batch_rows=128, shard_batches=3, progress=False
    )
    resid, mlp, sequence = all_rows(out)
    np.testing.assert_array_equal(resid, data[:, 0])
    np.testing.assert_array_equal(mlp, data[:, 1])
    np.testing.assert_array_equal(sequence, np.arange(N))
    assert len(list(out.glob("shard-*.h5"))) == 3  # 8 batches of 128, 3 to a shard
    stats = DiscBuffer(out, batch_size=64).stats
    torch.testing.assert_close(stats.output_mean, torch.from_numpy(data[::8, 1].mean(0)), rtol=0, atol=1e-5)
    scale = np.sqrt(((data[::8, 0] - data[::8, 0].mean(0)) ** 2).sum(-1).mean(0) / D)
    torch.testing.assert_close(stats.input_scale.flatten(), torch.from_numpy(scale), rtol=1e-4, atol=0)


def test_an_interrupted_import_resumes_to_the_same_folder(tmp_path, monkeypatch):
    data = seed_file(tmp_path / "seed.h5")
    write_rows, calls = ShardWriter.write_rows, []

    def killed_after_five(self, *args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        write_rows(self, *args)

    monkeypatch.setattr(ShardWriter, "write_rows", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        import_seed_activations(
            tmp_path / "seed.h5", tmp_path / "acts", batch_rows=128, shard_batches=3, progress=False
        )
    assert list((tmp_path / "acts").glob("*.partial"))  # the second shard, half written
    monkeypatch.setattr(ShardWriter, "write_rows", write_rows)
    out = import_seed_activations(
        tmp_path / "seed.h5", tmp_path / "acts", batch_rows=128, shard_batches=3, progress=False
    )
    resid, mlp, _ = all_rows(out)
    np.testing.assert_array_equal(resid, data[:, 0])
    np.testing.assert_array_equal(mlp, data[:, 1])


def test_bad_seed_files_get_one_clear_error(tmp_path):
    with h5py.File(tmp_path / "wrong.h5", "w") as f:
        f["tensor"] = np.zeros((10, 3, L, D), np.float32)
        f["other"] = np.zeros(3)
    with pytest.raises(
        ValueError, match=r"'tensor' must be floats of shape \(N, 2, n_layers, d_model\), not \(10, 3"
    ):
        import_seed_activations(tmp_path / "wrong.h5", tmp_path / "a", progress=False)
    with h5py.File(tmp_path / "none.h5", "w") as f:
        f["acts"] = np.zeros(3)
    with pytest.raises(ValueError, match="has no dataset 'tensor'"):
        import_seed_activations(tmp_path / "none.h5", tmp_path / "a", progress=False)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        import_seed_activations(tmp_path / "text.h5", tmp_path / "a", progress=False)
    seed_file(tmp_path / "seed.h5")
    import_seed_activations(tmp_path / "seed.h5", tmp_path / "a", batch_rows=500, progress=False)
    seed_file(tmp_path / "other.h5", n=600, seed=1)
    with pytest.raises(ValueError, match="different arguments"):  # another file into the same folder
        import_seed_activations(tmp_path / "other.h5", tmp_path / "a", batch_rows=500, progress=False)


def seed_state(layout: str, per_dimension: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seed Lightning module's state dict of a JumpReLU CLT with random weights, in one of its layouts."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(L, D, F, generator=g) / D**0.5
    W_dec = torch.randn(L, L, F, D, generator=g) / F**0.5
    std_shape = (L, D) if per_dimension else (L,)
    state = {
        "model.nonlinearity.theta": torch.rand(1, L, F, generator=g) * 0.4 - 0.05,  # a few at or below 0
        "model.nonlinearity.bandwidth": torch.tensor(0.2),
        "model.input_standardizer.mean": torch.randn(std_shape, generator=g),
        "model.input_standardizer.std": torch.rand(std_shape, generator=g) + 0.5,
        "model.output_standardizer.mean": torch.randn(std_shape, generator=g),
        "model.output_standardizer.std": torch.rand(std_shape, generator=g) + 0.5,
        "last_active": torch.zeros(L, F, dtype=torch.long),
    }
    if layout == "dense":
        mask = torch.ones(L, L).triu()
        state |= {"model.W_enc": W_enc, "model.W_dec": W_dec * mask[..., None, None], "model.mask": mask}
    else:
        state |= {"model.encoder.W": W_enc, "model.encoder.b": torch.randn(L, F, generator=g) * 0.1,
                  "model.decoder.b": torch.randn(L, D, generator=g) * 0.1}  # fmt: skip
        if layout == "per_layer":
            state["model.decoder.W"] = W_dec[range(L), range(L)]
        else:
            for target in range(L):
                state[f"model.decoder.W_{target}"] = W_dec[: target + 1, target]
    return state


def seed_reconstruction(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The seed's forward pass, written out: standardize, encode, JumpReLU, decode, de-standardize."""
    s = {key.removeprefix("model."): value for key, value in state.items()}

    def standardizer(name):
        mean, std = s[f"{name}.mean"], s[f"{name}.std"]
        return (mean, std) if mean.dim() == 2 else (mean[:, None], std[:, None])

    (in_mean, in_std), (out_mean, out_std) = (
        standardizer("input_standardizer"),
        standardizer("output_standardizer"),
    )
    acts = (x - in_mean) / in_std
    if "W_enc" in s:
        pre = torch.einsum("bld,ldf->blf", acts, s["W_enc"])
        theta = s["nonlinearity.theta"]
        features = pre * ((pre > theta) & (pre > 0))
        recon = torch.einsum("bsf,stfd,st->btd", features, s["W_dec"], s["mask"])
    else:
        pre = torch.einsum("bld,ldf->blf", acts, s["encoder.W"]) + s["encoder.b"]
        theta = s["nonlinearity.theta"]
        features = pre * ((pre > theta) & (pre > 0))
        if "decoder.W" in s:
            recon = torch.einsum("blf,lfd->bld", features, s["decoder.W"])
        else:
            recon = torch.stack(
                [torch.einsum("bsf,sfd->bd", features[:, : t + 1], s[f"decoder.W_{t}"]) for t in range(L)], 1
            )
        recon = recon + s["decoder.b"]
    return recon * out_std + out_mean


@pytest.mark.parametrize("layout", ["dense", "per_target", "per_layer"])
@pytest.mark.parametrize("per_dimension", [True, False])
def test_a_seed_checkpoint_becomes_a_clt_with_the_same_reconstructions(tmp_path, layout, per_dimension):
    state = seed_state(layout, per_dimension)
    torch.save(
        {"state_dict": state, "epoch": 3, "hyper_parameters": {"learning_rate": 1e-3}}, tmp_path / "seed.ckpt"
    )
    clt = import_seed_checkpoint(tmp_path / "seed.ckpt", tmp_path / "clt")
    assert clt.config.cross_layer == (layout != "per_layer")
    assert clt.config.bandwidth == pytest.approx(0.2)
    x = torch.randn(64, L, D, generator=torch.Generator().manual_seed(1)) * 2
    expected = seed_reconstruction(state, x)
    loaded = type(clt).load(tmp_path / "clt")  # what was saved, read back
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), expected, rtol=1e-4, atol=1e-4)
    assert (loaded.encode(x) > 0).float().mean() > 0.1  # features fire: the comparison means something


def test_bad_seed_checkpoints_get_one_clear_error(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint torch can read without running code"):
        import_seed_checkpoint(tmp_path / "junk.ckpt", tmp_path / "a")
    torch.save({"state_dict": {"model.something": torch.zeros(3)}}, tmp_path / "odd.ckpt")
    with pytest.raises(
        ValueError, match=r"neither the seed's W_enc/W_dec nor encoder.W/decoder.W_\* weights"
    ):
        import_seed_checkpoint(tmp_path / "odd.ckpt", tmp_path / "a")
    state = seed_state("dense", True)
    del state["model.nonlinearity.theta"]
    torch.save({"state_dict": state}, tmp_path / "topk.ckpt")
    with pytest.raises(ValueError, match="only JumpReLU seed CLTs can be imported"):
        import_seed_checkpoint(tmp_path / "topk.ckpt", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_the_command_line_imports_both(tmp_path, capsys):
    data = seed_file(tmp_path / "seed.h5", n=300)
    assert (
        main(
            [
                "import-seed-activations",
                str(tmp_path / "seed.h5"),
                str(tmp_path / "acts"),
                "--batch-rows",
                "100",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(all_rows(tmp_path / "acts")[1], data[:, 1])
    torch.save({"state_dict": seed_state("per_target", False)}, tmp_path / "seed.ckpt")
    assert main(["import-seed-checkpoint", str(tmp_path / "seed.ckpt"), str(tmp_path / "clt")]) == 0
    assert f"saved {tmp_path / 'clt'}: {L} layers × {F} features, d_model {D}" in capsys.readouterr().out
