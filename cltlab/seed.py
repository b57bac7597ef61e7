"""Bringing a seed user's work into cltlab: the crosslayer-transcoder project's activation file and checkpoints.

- **Activations.** The seed stores one HDF5 file with the dataset ``tensor`` of shape ``(N, 2, n_layers,
  d_model)`` (float32; ``[:, 0]`` the MLP inputs, ``[:, 1]`` the MLP outputs). ``import_seed_activations`` streams
  it into a DiscBuffer folder (``resid_mid`` / ``mlp_out``), in the file's row order, with normalization
  statistics, resumably: it writes through the harvest's shard writer, so a killed import started again continues
  from the last committed batch, and a second import of the same folder is refused while one runs. Rows carry no
  tokens (token id 0, position 1); ``sequence`` is the row's index in the seed file.
- **Checkpoints.** A seed Lightning checkpoint (or a bare state dict) of a JumpReLU CLT, in either of the seed's
  layouts: ``W_enc (L, d, F)`` with a dense ``W_dec (L, L, F, d)`` under a triangular ``mask`` (its
  ``SimpleCrossLayerTranscoder``), or ``encoder.W (L, d, F)`` / ``encoder.b (L, F)`` with one
  ``decoder.W_t (t + 1, F, d)`` per target t and ``decoder.b (L, d)`` (its ``CrossLayerTranscoder``); the
  thresholds ``nonlinearity.theta (1, L, F)`` and ``bandwidth``; the standardizers' ``mean`` / ``std`` (per layer,
  or per layer and dimension). ``import_seed_checkpoint`` writes a cltlab CLT whose ``decode(encode(x))`` equals
  the seed's reconstruction: a per-dimension ``std`` is folded into the encoder (inputs) and the decoder and its
  bias (outputs), leaving cltlab's scalar scales at 1. The seed's JumpReLU fires where ``x > θ`` and ``x > 0``;
  cltlab's θ is ``exp(log θ)``, so a θ at or below 0 becomes a tiny positive one (the same features up to values
  below 1e-9). The checkpoint is read with ``torch.load(weights_only=True)``: no code in it runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .clt import CrossLayerTranscoder
from .config import CLTConfig
from .harvest import check_existing
from .locks import HarvestLock
from .shard_writer import open_shard_for_writing
from .sites import to_storage
from .store import FORMAT, FORMAT_VERSION, SITES, shard_name, write_manifest

TINY_THRESHOLD = 1e-9
"""cltlab's θ for a seed threshold at or below zero (the seed's features are zero there below x = 0 anyway)."""


def import_seed_activations(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    batch_rows: int = 4096,
    shard_batches: int = 64,
    fsync: bool = True,
    progress: bool = True,
) -> Path:
    """Convert the seed's activation file ``source`` into the DiscBuffer folder ``out`` (resuming if it exists).

    ``dtype``: the storage dtype (``float32`` keeps the seed's values exactly; ``bfloat16`` or ``float16`` halve the
    size). ``batch_rows`` rows are read and committed at a time, ``shard_batches`` batches make a shard.
    """
    source, out = Path(source), Path(out)
    N, L, d = _seed_shape(source)
    provenance = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": f"seed:{source.name}", "corpus": str(source),
        "split": "seed", "sites": json.dumps(list(SITES)), "layer_start": 0, "layer_stop": L, "d_model": d,
        "dtype": dtype, "model_dtype": "float32", "seq_len": 2, "batch_size": batch_rows, "n_tokens": N,
        "shard_batches": shard_batches, "tokenizer": "none (imported from the seed)", "bos_token_id": 0,
        "config": json.dumps({"source": str(source)}), "cltlab_version": importlib.metadata.version("cltlab"),
    }  # fmt: skip
    manifest = check_existing(out, provenance)
    if manifest is not None and manifest.get("complete"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_batches = math.ceil(N / batch_rows)
    n_shards = math.ceil(n_batches / shard_batches)
    with HarvestLock(out, (0, 1), n_shards), h5py.File(source, "r") as f:
        bar = tqdm(total=N, unit="row", desc=f"import {source.name}", disable=not progress)
        tensor, no_sequences = f["tensor"], np.zeros((batch_rows, 2), np.int32)  # rows carry no tokens
        for index in range(n_shards):
            first, last = index * shard_batches, min((index + 1) * shard_batches, n_batches)
            rows = min(N, last * batch_rows) - first * batch_rows
            if (out / shard_name(index)).exists():
                bar.update(rows)
                continue
            shard = open_shard_for_writing(out, provenance, index, rows, last - first, fsync)
            try:
                bar.update(shard.rows)
                for number in range(first + shard.batches, last):
                    start, stop = number * batch_rows, min(N, (number + 1) * batch_rows)
                    shard.write_rows(number, _seed_rows(tensor, start, stop, dtype), no_sequences)
                    bar.update(stop - start)
                shard.finish()
            finally:
                shard.abort()
        bar.close()
        write_manifest(out, provenance, n_shards, fsync=fsync)
    return out


def _seed_shape(source: Path) -> tuple[int, int, int]:
    """``(N, n_layers, d_model)`` of the seed file, or one error naming what is wrong with it."""
    try:
        with h5py.File(source, "r") as f:
            if "tensor" not in f:
                raise ValueError(
                    f"{source} has no dataset 'tensor' (it has {sorted(f)}); is it a seed activation file?"
                )
            shape, kind = f["tensor"].shape, f["tensor"].dtype.kind
    except OSError as err:
        raise ValueError(f"{source} is not a readable HDF5 file: {err}") from None
    if len(shape) != 4 or shape[1] != 2 or kind != "f":
        raise ValueError(
            f"{source}: 'tensor' must be floats of shape (N, 2, n_layers, d_model), not {shape} {kind!r}."
        )
    return shape[0], shape[2], shape[3]


def _seed_rows(tensor: h5py.Dataset, start: int, stop: int, dtype: str) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of the seed's ``tensor`` as a shard batch's row datasets."""
    block = torch.from_numpy(tensor[start:stop].astype(np.float32, copy=False))  # (rows, 2, L, d)
    n = stop - start
    arrays = {site: to_storage(block[:, s].contiguous(), dtype).numpy() for s, site in enumerate(SITES)}
    arrays["tokens"] = np.zeros(n, np.int32)
    arrays["sequence"] = np.arange(start, stop, dtype=np.int64)
    arrays["position"] = np.ones(n, np.int32)
    return arrays


def import_seed_checkpoint(checkpoint: str | Path, out: str | Path) -> CrossLayerTranscoder:
    """Convert a seed checkpoint of a JumpReLU CLT into a cltlab CLT saved in the folder ``out``; returns it."""
    checkpoint = Path(checkpoint)
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ValueError(
            f"{checkpoint} is not a checkpoint torch can read without running code: {err}"
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds no state dict (a Lightning checkpoint or a bare state dict).")
    state = {
        key.removeprefix("model."): value for key, value in state.items() if isinstance(value, torch.Tensor)
    }
    W_enc, b_enc, W_dec, b_dec = _seed_weights(state, checkpoint)
    L, d, F = W_enc.shape
    cross_layer = "decoder.W" not in state  # the seed's per-layer transcoder has one decoder.W (L, F, d)
    if "nonlinearity.theta" not in state:
        raise ValueError(
            f"{checkpoint} has no 'nonlinearity.theta': only JumpReLU seed CLTs can be imported."
        )
    theta = state["nonlinearity.theta"].float().reshape(L, F)
    bandwidth = float(state.get("nonlinearity.bandwidth", torch.tensor(1.0)))
    in_mean, in_std = _standardizer(state, "input_standardizer", L, d)
    out_mean, out_std = _standardizer(state, "output_standardizer", L, d)
    config = CLTConfig(n_layers=L, d_model=d, d_features=F, bandwidth=bandwidth, cross_layer=cross_layer)
    clt = CrossLayerTranscoder(config)
    with torch.no_grad():
        clt.W_enc.copy_(W_enc / in_std[:, :, None])  # ((x − μ) / σ) · W  =  (x − μ) · (W / σ)
        clt.b_enc.copy_(b_enc)
        for source, W in enumerate(clt.W_dec):  # (F, n_targets, d): targets s, s + 1, …, scaled by their σ
            targets = slice(source, source + W.shape[1])
            W.copy_(W_dec[source, targets].transpose(0, 1) * out_std[None, targets])
        clt.b_dec.copy_(b_dec * out_std)
        clt.activation.log_threshold.copy_(theta.clamp_min(TINY_THRESHOLD).log())
        clt.set_normalization(in_mean, torch.ones(L), out_mean, torch.ones(L))
    clt.save(out)
    return clt


def _seed_weights(state: dict, checkpoint: Path):
    """``W_enc (L, d, F)``, ``b_enc (L, F)``, the dense ``W_dec (L_source, L_target, F, d)`` and ``b_dec (L, d)``
    from either seed layout."""
    if "W_enc" in state and "W_dec" in state:  # SimpleCrossLayerTranscoder: dense decoder under its mask
        W_enc, W_dec = state["W_enc"].float(), state["W_dec"].float()
        mask = state.get("mask", torch.ones(W_dec.shape[:2]).triu()).float()
        L, _, F = W_enc.shape
        return W_enc, torch.zeros(L, F), W_dec * mask[:, :, None, None], torch.zeros(L, W_enc.shape[1])
    if "encoder.W" in state:
        W_enc = state["encoder.W"].float()
        L, d, F = W_enc.shape
        b_enc = state.get("encoder.b", torch.zeros(L, F)).float()
        b_dec = state.get("decoder.b", torch.zeros(L, d)).float()
        W_dec = torch.zeros(L, L, F, d)
        if "decoder.W" in state:  # a per-layer transcoder: source l writes to target l only
            W_dec[range(L), range(L)] = state["decoder.W"].float()
            return W_enc, b_enc, W_dec, b_dec
        for target in range(L):  # decoder.W_t: (t + 1, F, d), the sources 0 … t of target t
            W_dec[: target + 1, target] = state[f"decoder.W_{target}"].float()
        return W_enc, b_enc, W_dec, b_dec
    raise ValueError(
        f"{checkpoint} has neither the seed's W_enc/W_dec nor encoder.W/decoder.W_* weights "
        f"(keys: {sorted(state)[:12]})."
    )


def _standardizer(state: dict, name: str, L: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (L, d), std (L, d))`` of a seed standardizer (per layer or per dimension; none: 0 and 1)."""
    mean, std = state.get(f"{name}.mean"), state.get(f"{name}.std")
    if mean is None or std is None:
        return torch.zeros(L, d), torch.ones(L, d)
    mean, std = mean.float(), std.float()
    if mean.shape == (L,):  # per layer
        mean, std = mean[:, None].expand(L, d), std[:, None].expand(L, d)
    return mean.reshape(L, d).clone(), std.reshape(L, d).clone()
