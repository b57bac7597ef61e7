"""circuit-tracer export/import: file layout, and the same features and reconstruction on raw inputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from helpers import make_clt
from safetensors.torch import load_file, save_file

from cltlab import CrossLayerTranscoder, export_circuit_tracer
from cltlab.interop import import_circuit_tracer

L, D, F = 4, 8, 16
# Folding the normalization into the weights reorders float32 arithmetic: results agree to RTOL of their scale
# (the observed error is ~2e-7).
RTOL = 1e-5


def raw_inputs(clt: CrossLayerTranscoder, batch: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, clt.n_layers, clt.d_model, generator=generator) * clt.input_scale + clt.input_mean
    )


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to RTOL of the largest magnitude in ``a``."""
    return torch.allclose(a, b, rtol=0, atol=RTOL * a.abs().max().item())


def assert_same_transcoder(a: CrossLayerTranscoder, b: CrossLayerTranscoder, x: torch.Tensor) -> None:
    out_a, out_b = a(x), b(x)
    assert close(out_a.preactivations, out_b.preactivations)
    assert torch.equal(out_a.features > 0, out_b.features > 0)
    assert close(out_a.features, out_b.features)
    assert close(out_a.reconstruction, out_b.reconstruction)


def test_export_writes_circuit_tracer_layout(tmp_path):
    clt = make_clt(L, D, F)
    directory = export_circuit_tracer(clt, tmp_path / "ct", scan="my-scan", model_name="org/tiny-model")
    assert directory == tmp_path / "ct"
    names = sorted(p.name for p in directory.iterdir())
    expected = sorted(
        [f"W_enc_{i}.safetensors" for i in range(L)] + [f"W_dec_{i}.safetensors" for i in range(L)]
    )
    assert names == sorted(expected + ["cltlab.json", "config.yaml"])
    for i in range(L):
        enc = load_file(str(directory / f"W_enc_{i}.safetensors"))
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (F, D),
            f"b_enc_{i}": (F,),
            f"b_dec_{i}": (D,),
            f"threshold_{i}": (F,),
        }
        dec = load_file(str(directory / f"W_dec_{i}.safetensors"))
        assert list(dec) == [f"W_dec_{i}"]
        assert dec[f"W_dec_{i}"].shape == (F, L - i, D)
        assert all(t.dtype == torch.float32 for t in [*enc.values(), *dec.values()])
        assert torch.allclose(enc[f"threshold_{i}"], clt.activation.threshold[i])
    meta = json.loads((directory / "cltlab.json").read_text())
    assert meta == {
        "source": "cltlab",
        "format_version": 2,
        "n_layers": L,
        "d_model": D,
        "d_features": F,
        "layer_offset": 0,
        "model_n_layers": L,
        "scan": "my-scan",
        "model_name": "org/tiny-model",
    }


def test_config_yaml_holds_what_circuit_tracer_reads(tmp_path):
    """circuit-tracer's loader reads model_kind, the two hooks and scan from config.yaml; its CLI, model_name."""
    directory = export_circuit_tracer(make_clt(L, D, F), tmp_path / "ct", model_name="org/tiny-model")
    config = yaml.safe_load((directory / "config.yaml").read_text())
    scan = json.loads((directory / "cltlab.json").read_text())["scan"]
    assert config == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "scan": scan,
        "model_name": "org/tiny-model",
    }
    # The default scan names the model and hashes the exported weights: the same for the same transcoder.
    assert scan.startswith("cltlab-tiny-model-") and len(scan) == len("cltlab-tiny-model-") + 12
    again = export_circuit_tracer(make_clt(L, D, F), tmp_path / "again", model_name="org/tiny-model")
    assert json.loads((again / "cltlab.json").read_text())["scan"] == scan
    other = export_circuit_tracer(make_clt(L, D, F, seed=1), tmp_path / "other")
    other_scan = yaml.safe_load((other / "config.yaml").read_text())["scan"]
    assert other_scan.startswith("cltlab-") and other_scan[-12:] != scan[-12:]
    assert "model_name" not in yaml.safe_load((other / "config.yaml").read_text())


def test_relative_directory_is_returned_absolute(tmp_path, monkeypatch):
    """circuit-tracer looks a relative transcoder path up in its own cache, so the export says where it is."""
    monkeypatch.chdir(tmp_path)
    directory = export_circuit_tracer(make_clt(2, D, F), "ct")
    assert directory.is_absolute() and directory == tmp_path / "ct"


def test_exported_weights_fold_the_normalization(tmp_path):
    clt = make_clt(L, D, F)
    directory = export_circuit_tracer(clt, tmp_path / "ct")
    x = raw_inputs(clt)
    f = clt.encode(x)
    # circuit-tracer's own arithmetic on the raw activations, with no normalization anywhere.
    for i in range(L):
        enc = load_file(str(directory / f"W_enc_{i}.safetensors"))
        pre = x[:, i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        assert close(clt.preactivations(x)[:, i], pre)
    recon = torch.stack(
        [load_file(str(directory / f"W_enc_{i}.safetensors"))[f"b_dec_{i}"] for i in range(L)]
    )
    recon = recon.expand(x.shape[0], -1, -1).clone()
    for i in range(L):
        W_dec = load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        recon[:, i:] += torch.einsum("bf,ftd->btd", f[:, i], W_dec)
    expected = clt.decode(f)
    assert close(expected, recon)


def test_round_trip_gives_the_same_features_and_reconstruction(tmp_path):
    clt = make_clt(L, D, F, layer_offset=2)
    assert not torch.equal(clt.output_scale, torch.ones(L, 1))
    directory = export_circuit_tracer(clt, tmp_path / "ct", model_n_layers=L + 2)
    imported = import_circuit_tracer(directory, bandwidth=0.05)
    assert (imported.n_layers, imported.d_model, imported.d_features) == (L, D, F)
    assert imported.config.cross_layer and imported.config.layer_offset == 2
    assert imported.config.bandwidth == 0.05 and imported.activation.bandwidth == 0.05
    # Identity normalization: everything is in the weights.
    assert torch.equal(imported.input_mean, torch.zeros(L, D)) and torch.equal(
        imported.output_scale, torch.ones(L, 1)
    )
    assert torch.allclose(imported.activation.threshold, clt.activation.threshold, rtol=1e-6)
    assert_same_transcoder(clt, imported, raw_inputs(clt))


def test_per_layer_transcoder_exports_with_zero_cross_layer_blocks(tmp_path):
    plt = make_clt(L, D, F, cross_layer=False)
    directory = export_circuit_tracer(plt, tmp_path / "ct")
    for i in range(L):
        W_dec = load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        assert W_dec.shape == (F, L - i, D)
        assert (W_dec[:, 1:] == 0).all()
        assert torch.allclose(W_dec[:, 0], plt.W_dec[i][:, 0] * plt.output_scale[i])
    imported = import_circuit_tracer(directory)
    assert imported.config.cross_layer
    assert_same_transcoder(plt, imported, raw_inputs(plt))


def test_import_then_save_load_round_trip(tmp_path):
    clt = make_clt(L, D, F)
    imported = import_circuit_tracer(export_circuit_tracer(clt, tmp_path / "ct"))
    loaded = CrossLayerTranscoder.load(imported.save(tmp_path / "saved"))
    x = raw_inputs(clt)
    assert torch.equal(loaded(x).reconstruction, imported(x).reconstruction)


def test_import_without_cltlab_metadata_and_with_zero_thresholds(tmp_path):
    """A plain circuit-tracer directory: no cltlab.json, thresholds of 0 (a ReLU)."""
    clt = make_clt(2, D, F)
    directory = export_circuit_tracer(clt, tmp_path / "ct")
    (directory / "cltlab.json").unlink()
    for i in range(2):
        path = directory / f"W_enc_{i}.safetensors"
        enc = load_file(str(path))
        enc[f"threshold_{i}"] = torch.zeros(F)
        save_file(enc, str(path))
    imported = import_circuit_tracer(directory)
    assert imported.config.layer_offset == 0
    x = raw_inputs(clt)
    out = imported(x)
    assert torch.isfinite(imported.activation.threshold).all() and (imported.activation.threshold > 0).all()
    assert torch.allclose(out.features, torch.relu(out.preactivations))


def test_import_errors_name_the_problem(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"holds no W_enc_<i>\.safetensors files: not a circuit-tracer CLT"
    ):
        import_circuit_tracer(tmp_path)
    directory = export_circuit_tracer(make_clt(3, D, F), tmp_path / "ct")
    (directory / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"W_dec_1\.safetensors is missing"):
        import_circuit_tracer(directory)
    save_file(
        {"W_dec_1": torch.zeros(F, 3, D)}, str(directory / "W_dec_1.safetensors")
    )  # should be (F, 2, D)
    with pytest.raises(
        ValueError, match=r"Layer 1 of .* has W_enc \(16, 8\) and W_dec \(16, 3, 8\); expected"
    ):
        import_circuit_tracer(directory)


def test_offset_transcoder_is_padded_to_the_model_layers(tmp_path, caplog):
    """Layers 0-1 and 6 of a 7-layer model are padding; the CLT's layers 0..3 land on files 2..5."""
    offset, n_model = 2, L + 3
    clt = make_clt(L, D, F, layer_offset=offset)
    with caplog.at_level(logging.WARNING, logger="cltlab"):
        directory = export_circuit_tracer(clt, tmp_path / "ct", model_n_layers=n_model)
    assert "Padding the circuit-tracer export to the model's 7 layers: only layers 2..5 carry features" in (
        caplog.text
    )
    assert len(list(directory.glob("W_enc_*.safetensors"))) == n_model
    meta = json.loads((directory / "cltlab.json").read_text())
    assert (meta["layer_offset"], meta["n_layers"], meta["model_n_layers"]) == (offset, L, n_model)
    enc = [load_file(str(directory / f"W_enc_{i}.safetensors")) for i in range(n_model)]
    dec = [load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(n_model)]
    x = raw_inputs(clt)  # (batch, L, D) at model layers 2..5
    model_x = torch.randn(x.shape[0], n_model, D) * 10
    model_x[:, offset : offset + L] = x
    # circuit-tracer's arithmetic: file i reads model layer i and writes to model layers i.. n_model - 1.
    pre = torch.stack(
        [model_x[:, i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"] for i in range(n_model)], 1
    )
    threshold = torch.stack([enc[i][f"threshold_{i}"] for i in range(n_model)])
    features = pre * (pre > threshold)  # (batch, n_model, F)
    padding = [0, 1, n_model - 1]
    assert (features[:, padding] == 0).all() and (pre[:, padding] == 0).all()
    assert torch.isfinite(threshold).all() and (threshold[padding] > 0).all()
    out = clt(x)
    assert close(out.preactivations, pre[:, offset : offset + L])
    assert torch.equal(out.features > 0, features[:, offset : offset + L] > 0)
    recon = torch.stack([enc[i][f"b_dec_{i}"] for i in range(n_model)]).expand(x.shape[0], -1, -1).clone()
    for i in range(n_model):
        recon[:, i:] += torch.einsum("bf,ftd->btd", features[:, i], dec[i])
    assert (recon[:, padding] == 0).all()
    assert close(out.reconstruction, recon[:, offset : offset + L])
    imported = import_circuit_tracer(directory)
    assert (imported.n_layers, imported.config.layer_offset) == (L, offset)
    assert torch.allclose(imported.activation.threshold, clt.activation.threshold, rtol=1e-6)
    assert_same_transcoder(clt, imported, x)


def test_shorter_transcoder_is_padded_after_its_last_layer(tmp_path):
    clt = make_clt(L, D, F)
    directory = export_circuit_tracer(clt, tmp_path / "ct", model_n_layers=L + 2)
    assert load_file(str(directory / "W_dec_0.safetensors"))["W_dec_0"].shape == (F, L + 2, D)
    assert (load_file(str(directory / f"W_enc_{L}.safetensors"))[f"W_enc_{L}"] == 0).all()
    imported = import_circuit_tracer(directory)
    assert (imported.n_layers, imported.config.layer_offset) == (L, 0)
    assert_same_transcoder(clt, imported, raw_inputs(clt))
    # Exporting again unpadded into the same folder leaves no file of the longer export behind.
    export_circuit_tracer(clt, directory)
    assert len(list(directory.glob("W_enc_*.safetensors"))) == len(list(directory.glob("W_dec_*"))) == L
    assert_same_transcoder(clt, import_circuit_tracer(directory), raw_inputs(clt))


def test_offset_transcoder_without_model_n_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"starts at model layer 3 \(layer_offset=3\).*pass model_n_layers="):
        export_circuit_tracer(make_clt(L, D, F, layer_offset=3), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ValueError, match=r"covers model layers 3\.\.6, more than model_n_layers=6"):
        export_circuit_tracer(make_clt(L, D, F, layer_offset=3), tmp_path / "ct", model_n_layers=6)


def test_import_of_an_export_missing_padded_files_is_a_clear_error(tmp_path):
    directory = export_circuit_tracer(make_clt(2, D, F, layer_offset=1), tmp_path / "ct", model_n_layers=4)
    for i in (2, 3):
        (directory / f"W_enc_{i}.safetensors").unlink()
    with pytest.raises(ValueError, match=r"describes files 1\.\.2, but .* holds 2 W_enc files"):
        import_circuit_tracer(directory)
