"""Read and write circuit-tracer's CLT layout.

circuit-tracer loads a directory with, for every layer i, ``W_enc_{i}.safetensors`` holding ``W_enc_{i}``
``(d_features, d_model)``, ``b_enc_{i}`` ``(d_features,)``, ``b_dec_{i}`` ``(d_model,)``, ``threshold_{i}``
``(d_features,)``, and ``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` ``(d_features, n_layers - i, d_model)``.
It applies no normalization, so ours is folded into the weights on export:

    h = ((x − μ_in) / s_in) W + b        =  x (W / s_in) + (b − (μ_in / s_in) W)
    y = s_out · (Σ f W_dec + b_dec) + μ_out  =  Σ f (s_out W_dec) + (s_out b_dec + μ_out)

A per-layer transcoder is exported as a CLT whose cross-layer decoder blocks are zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .clt import CrossLayerTranscoder
from .config import CLTConfig


@torch.no_grad()
def export_circuit_tracer(clt: CrossLayerTranscoder, directory: str | Path) -> Path:
    """Write ``clt`` in circuit-tracer's layout (float32, normalization folded in)."""
    if clt.config.activation != "jumprelu":
        raise ValueError(
            f"circuit-tracer reads JumpReLU transcoders; convert this {clt.config.activation} one first "
            "with clt.to_jumprelu(batches)."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    L = clt.n_layers
    out_scale = clt.output_scale.float().cpu()  # (n_layers, 1)
    for i in range(L):
        W = clt.W_enc[i].float().cpu() / clt.input_scale[i].float().cpu()  # (d_model, d_features)
        b = clt.b_enc[i].float().cpu() - (clt.input_mean[i].float().cpu() @ W)
        save_file(
            {
                f"W_enc_{i}": W.T.contiguous(),
                f"b_enc_{i}": b.contiguous(),
                f"b_dec_{i}": (clt.b_dec[i].float().cpu() * out_scale[i] + clt.output_mean[i].float().cpu()),
                f"threshold_{i}": clt.activation.threshold[i].float().cpu().contiguous(),
            },
            str(directory / f"W_enc_{i}.safetensors"),
        )
        W_dec = torch.zeros(clt.d_features, L - i, clt.d_model)
        n = clt.n_targets(i)
        W_dec[:, :n] = clt.W_dec[i].float().cpu() * out_scale[i : i + n]  # scale by each target's s_out
        save_file({f"W_dec_{i}": W_dec}, str(directory / f"W_dec_{i}.safetensors"))
    meta = {
        "source": "cltlab",
        "n_layers": L,
        "d_model": clt.d_model,
        "d_features": clt.d_features,
        "layer_offset": clt.config.layer_offset,
    }
    (directory / "cltlab.json").write_text(json.dumps(meta, indent=2))
    return directory


@torch.no_grad()
def import_circuit_tracer(directory: str | Path, *, bandwidth: float = 0.1) -> CrossLayerTranscoder:
    """Read a circuit-tracer CLT directory into a ``CrossLayerTranscoder`` with identity normalization."""
    directory = Path(directory)
    enc_files = sorted(directory.glob("W_enc_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not enc_files:
        raise FileNotFoundError(
            f"{directory} holds no W_enc_<i>.safetensors files: not a circuit-tracer CLT."
        )
    L = len(enc_files)
    first = load_file(str(enc_files[0]))
    F, d = first["W_enc_0"].shape
    meta_path = directory / "cltlab.json"
    offset = json.loads(meta_path.read_text()).get("layer_offset", 0) if meta_path.exists() else 0
    threshold = first["threshold_0"]
    clt = CrossLayerTranscoder(
        CLTConfig(
            n_layers=L,
            d_model=d,
            d_features=F,
            cross_layer=True,
            bandwidth=bandwidth,
            threshold_init=float(threshold.clamp_min(1e-6).mean()),
            layer_offset=offset,
        )
    )
    for i in range(L):
        enc = load_file(str(directory / f"W_enc_{i}.safetensors"))
        dec_path = directory / f"W_dec_{i}.safetensors"
        if not dec_path.exists():
            raise FileNotFoundError(f"{dec_path} is missing: a circuit-tracer CLT needs one per W_enc file.")
        W_dec = load_file(str(dec_path))[f"W_dec_{i}"]
        if enc[f"W_enc_{i}"].shape != (F, d) or W_dec.shape != (F, L - i, d):
            raise ValueError(
                f"Layer {i} of {directory} has W_enc {tuple(enc[f'W_enc_{i}'].shape)} and W_dec {tuple(W_dec.shape)}; "
                f"expected ({F}, {d}) and ({F}, {L - i}, {d})."
            )
        clt.W_enc[i] = enc[f"W_enc_{i}"].T
        clt.b_enc[i] = enc[f"b_enc_{i}"]
        clt.b_dec[i] = enc[f"b_dec_{i}"]
        # θ = exp(log θ): a zero threshold (a plain ReLU) becomes the smallest positive float.
        clt.activation.log_threshold[i] = (
            enc[f"threshold_{i}"].float().clamp_min(torch.finfo(torch.float32).tiny).log()
        )
        clt.W_dec[i].copy_(W_dec)
    return clt
