"""Read and write circuit-tracer's CLT layout, and write the feature files of its graph viewer.

circuit-tracer loads a directory with, for every layer i, ``W_enc_{i}.safetensors`` holding ``W_enc_{i}``
``(d_features, d_model)``, ``b_enc_{i}`` ``(d_features,)``, ``b_dec_{i}`` ``(d_model,)``, ``threshold_{i}``
``(d_features,)``, and ``W_dec_{i}.safetensors`` holding ``W_dec_{i}`` ``(d_features, n_layers - i, d_model)``,
plus a ``config.yaml`` naming the kind of transcoder, its two hooks and a ``scan`` id for its feature pages.
It applies no normalization, so ours is folded into the weights on export:

    h = ((x − μ_in) / s_in) W + b        =  x (W / s_in) + (b − (μ_in / s_in) W)
    y = s_out · (Σ f W_dec + b_dec) + μ_out  =  Σ f (s_out W_dec) + (s_out b_dec + μ_out)

A per-layer transcoder is exported as a CLT whose cross-layer decoder blocks are zero. circuit-tracer reads file
i as model layer i, so a CLT that does not cover every layer of its model is padded with layers whose features
never fire; ``cltlab.json`` records which files hold the real layers, so ``import_circuit_tracer`` drops them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .clt import CrossLayerTranscoder
from .config import CLTConfig
from .jumprelu import JumpReLU

log = logging.getLogger("cltlab")

FEATURE_INPUT_HOOK = "hook_resid_mid"
"""TransformerLens's name of the site cltlab calls ``resid_mid`` (the input of the pre-MLP norm)."""
FEATURE_OUTPUT_HOOK = "hook_mlp_out"
"""TransformerLens's name of ``mlp_out``."""
PAD_THRESHOLD = 6e4
"""Threshold of a padding layer's features. Their pre-activation is exactly 0 (zero weights and bias), so any
positive threshold keeps them off; this one stays finite in every dtype circuit-tracer may load into (float16
tops out at 65504), so neither it nor its pseudo-gradient becomes inf or NaN."""


@torch.no_grad()
def export_circuit_tracer(
    clt: CrossLayerTranscoder,
    directory: str | Path,
    *,
    scan: str | None = None,
    model_name: str | None = None,
    model_n_layers: int | None = None,
) -> Path:
    """Write ``clt`` in circuit-tracer's layout (float32, normalization folded in) with its ``config.yaml``.

    Args:
        scan: circuit-tracer's id of this feature set (in graph files and feature links); by default
            ``cltlab-<model>-<hash of the exported weights>``, the same for the same weights.
        model_name: the model circuit-tracer's command line loads when it is given none (``model_name`` in
            ``config.yaml``); also names the default scan.
        model_n_layers: the model's number of layers. Needed when the CLT does not start at layer 0; when it
            covers fewer layers than this, the rest are written as padding whose features never fire.

    Returns the directory as an absolute path: circuit-tracer's ``ReplacementModel.from_pretrained(model,
    str(path))`` takes a local folder only by its absolute path (a relative one is looked up in its cache).
    """
    n_files = _n_files(clt, model_n_layers)
    offset, L = clt.config.layer_offset, clt.n_layers
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("W_enc_*.safetensors"), *directory.glob("W_dec_*.safetensors")]:
        stale.unlink()  # circuit-tracer would read the extra layers of an earlier, longer export as its own
    digest = hashlib.sha256()
    for layer, tensors in enumerate(_layer_files(clt, n_files)):
        for prefix, part in tensors.items():
            for name, tensor in part.items():
                digest.update(name.encode())
                digest.update(tensor.numpy())
            save_file(part, str(directory / f"{prefix}_{layer}.safetensors"))
    if scan is None:
        model = f"{Path(model_name).name}-" if model_name else ""
        scan = f"cltlab-{model}{digest.hexdigest()[:12]}"
    meta = {
        "source": "cltlab",
        "format_version": 2,
        "n_layers": L,
        "d_model": clt.d_model,
        "d_features": clt.d_features,
        "layer_offset": offset,
        "model_n_layers": n_files,
        "scan": scan,
        "model_name": model_name,
    }
    (directory / "cltlab.json").write_text(json.dumps(meta, indent=2))
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "scan": scan,
    }
    if model_name is not None:
        config["model_name"] = model_name
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


def _n_files(clt: CrossLayerTranscoder, model_n_layers: int | None) -> int:
    """How many layer files an export of ``clt`` writes (one per model layer); raises when circuit-tracer could
    not read it as it is."""
    if not isinstance(clt.activation, JumpReLU):
        raise ValueError(
            f"circuit-tracer reads JumpReLU transcoders; convert this {clt.config.activation_kind} one first "
            "with clt.to_jumprelu(batches)."
        )
    offset, L = clt.config.layer_offset, clt.n_layers
    if model_n_layers is None and offset > 0:
        raise ValueError(
            f"This transcoder starts at model layer {offset} (layer_offset={offset}), but circuit-tracer reads "
            "the first layer of an export as model layer 0; pass model_n_layers=<the model's number of layers> "
            "so the layers it does not cover are padded with features that never fire."
        )
    n_files = L if model_n_layers is None else model_n_layers
    if n_files < offset + L:
        raise ValueError(
            f"This transcoder covers model layers {offset}..{offset + L - 1}, more than "
            f"model_n_layers={model_n_layers}; pass the model's number of layers."
        )
    if n_files != L:
        log.warning(
            "Padding the circuit-tracer export to the model's %d layers: only layers %d..%d carry features, "
            "so that file i is model layer i.",
            n_files,
            offset,
            offset + L - 1,
        )
    return n_files


def _layer_files(clt: CrossLayerTranscoder, n_files: int) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """For each model layer 0..n_files-1, the tensors of its ``W_enc`` and ``W_dec`` files (float32, CPU)."""
    offset, F, d = clt.config.layer_offset, clt.d_features, clt.d_model
    out_scale = clt.output_scale.float().cpu()  # (n_layers, 1)
    for layer in range(n_files):
        i = layer - offset  # the CLT's own index of this layer
        W_dec = torch.zeros(F, n_files - layer, d)
        if 0 <= i < clt.n_layers:
            W = clt.W_enc[i].float().cpu() / clt.input_scale[i].float().cpu()  # (d_model, d_features)
            b = clt.b_enc[i].float().cpu() - (clt.input_mean[i].float().cpu() @ W)
            b_dec = clt.b_dec[i].float().cpu() * out_scale[i] + clt.output_mean[i].float().cpu()
            threshold = clt.activation.threshold[i].float().cpu()
            n = clt.n_targets(i)
            W_dec[:, :n] = clt.W_dec[i].float().cpu() * out_scale[i : i + n]  # scale by each target's s_out
        else:  # padding: no input, no output, never fires
            W, b, b_dec, threshold = (
                torch.zeros(d, F),
                torch.zeros(F),
                torch.zeros(d),
                torch.full((F,), PAD_THRESHOLD),
            )
        yield {
            "W_enc": {
                f"W_enc_{layer}": W.T.contiguous(),
                f"b_enc_{layer}": b.contiguous(),
                f"b_dec_{layer}": b_dec.contiguous(),
                f"threshold_{layer}": threshold.contiguous(),
            },
            "W_dec": {f"W_dec_{layer}": W_dec},
        }


@torch.no_grad()
def import_circuit_tracer(directory: str | Path, *, bandwidth: float = 0.1) -> CrossLayerTranscoder:
    """Read a circuit-tracer CLT directory into a ``CrossLayerTranscoder`` with identity normalization.

    A cltlab export keeps its layer offset, and the layers padded in on export are left out again.
    """
    directory = Path(directory)
    enc_files = sorted(directory.glob("W_enc_*.safetensors"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not enc_files:
        raise FileNotFoundError(
            f"{directory} holds no W_enc_<i>.safetensors files: not a circuit-tracer CLT."
        )
    n_files = len(enc_files)
    meta_path = directory / "cltlab.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    offset = meta.get("layer_offset", 0)
    L = meta.get("n_layers", n_files)
    # Since format 2 there is one file per model layer, so the CLT's layer i is file offset + i.
    first = offset if "model_n_layers" in meta else 0
    if first + L > n_files:
        raise ValueError(
            f"{meta_path} describes files {first}..{first + L - 1}, but {directory} holds {n_files} "
            "W_enc files; export the transcoder again."
        )
    first_enc = load_file(str(directory / f"W_enc_{first}.safetensors"))
    F, d = first_enc[f"W_enc_{first}"].shape
    threshold = first_enc[f"threshold_{first}"]
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
        layer = first + i  # the file's index: the model layer in circuit-tracer's numbering
        enc = load_file(str(directory / f"W_enc_{layer}.safetensors"))
        dec_path = directory / f"W_dec_{layer}.safetensors"
        if not dec_path.exists():
            raise FileNotFoundError(f"{dec_path} is missing: a circuit-tracer CLT needs one per W_enc file.")
        W_dec = load_file(str(dec_path))[f"W_dec_{layer}"]
        W_enc = enc[f"W_enc_{layer}"]
        if W_enc.shape != (F, d) or W_dec.shape != (F, n_files - layer, d):
            raise ValueError(
                f"Layer {layer} of {directory} has W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)}; "
                f"expected ({F}, {d}) and ({F}, {n_files - layer}, {d})."
            )
        clt.W_enc[i] = W_enc.T
        clt.b_enc[i] = enc[f"b_enc_{layer}"]
        clt.b_dec[i] = enc[f"b_dec_{layer}"]
        # θ = exp(log θ): a zero threshold (a plain ReLU) becomes the smallest positive float.
        clt.activation.log_threshold[i] = (
            enc[f"threshold_{layer}"].float().clamp_min(torch.finfo(torch.float32).tiny).log()
        )
        clt.W_dec[i].copy_(W_dec[:, : L - i])  # the targets past the CLT's last layer are padding
    return clt


def export_feature_files(
    stats,
    clt: CrossLayerTranscoder,
    model,
    out_dir: str | Path,
    *,
    scan: str = "cltlab",
    features: dict[int, list[int]] | None = None,
) -> Path:
    """Write circuit-tracer's feature files ``<out_dir>/features/<scan>/<index>.json`` (beside the graph files
    ``AttributionGraph.export_graph_files`` wrote into ``out_dir``); return that folder."""
    from .attribution.export import cantor
    from .dashboard import Pages

    pages = Pages(stats, clt, model, neighbours=1)
    folder = Path(out_dir) / "features" / scan
    folder.mkdir(parents=True, exist_ok=True)
    chosen = features or {layer: list(range(stats.d_features)) for layer in range(stats.n_layers)}
    edges = stats.bin_edges
    for layer, picked in chosen.items():
        for feature in picked:
            counts = stats.histogram[layer, feature].double()
            active = counts.nonzero().squeeze(1)
            cumulative = counts.cumsum(0) / counts.sum().clamp_min(1)
            quantiles = [
                edges[int((cumulative < q).sum().clamp_max(len(counts) - 1)) + 1].item()
                for q in (0.5, 0.9, 0.99)
            ]
            groups = [("Top activations", None)]
            if stats.band_rows is not None:  # then each activation band, highest first
                n_bands = stats.band_rows.shape[2]
                groups += [(f"Interval {n_bands - b}: ({b / n_bands:.2f}, {(b + 1) / n_bands:.2f}] × max", b)
                           for b in reversed(range(n_bands))]  # fmt: skip
            quantile_examples = [
                dict(quantile_name=name, examples=[
                    dict(tokens=texts, tokens_acts_list=acts, train_token_ind=focus, is_repeated_datapoint=False)
                    for _, texts, acts, focus in pages.contexts(layer, feature, band)
                ])
                for name, band in groups
            ]  # fmt: skip
            logits = pages.logits
            record = dict(
                transcoder_id=scan,
                index=cantor(layer, feature),
                examples_quantiles=quantile_examples,
                top_logits=[pages.text(int(t)) for t in logits.top_ids[layer, feature]],
                bottom_logits=[pages.text(int(t)) for t in logits.bottom_ids[layer, feature]],
                act_min=edges[int(active.min())].item() if len(active) else 0.0,
                act_max=stats.max_activation[layer, feature].item(),
                quantile_values=quantiles if len(active) else [],
                histogram=counts.tolist(),
                activation_frequency=stats.frequency[layer, feature].item(),
            )
            (folder / f"{cantor(layer, feature)}.json").write_text(json.dumps(record))
    return folder
