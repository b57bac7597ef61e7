"""Harvest ``resid_mid`` and ``mlp_out`` of a range of layers with nnsight into a DiscBuffer file.

The trace stops right after the last needed MLP, so the rest of the model and the LM head never run.
BOS positions are not stored (their activations are outliers a transcoder should not spend features on; the
replacement model passes them through unchanged). Rows are shuffled within each forward batch before writing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .buffer import FORMAT, FORMAT_VERSION, STORAGE_DTYPES, read_info, to_storage
from .config import HarvestConfig
from .corpus import token_sequences
from .models import LoadedModel, load_model

log = logging.getLogger("cltlab")


class SiteActivations(NamedTuple):
    """Activations of the two sites for a batch of sequences."""

    resid_mid: torch.Tensor
    """``(batch, seq, n_layers, d_model)``"""
    mlp_out: torch.Tensor
    """``(batch, seq, n_layers, d_model)``"""
    logits: torch.Tensor | None = None
    """``(batch, seq, vocab)`` when the whole model was run (``with_logits=True``), else None."""


@torch.no_grad()
def trace_sites(
    model: LoadedModel, ids: torch.Tensor, layer_start: int, layer_stop: int, *, with_logits: bool = False
) -> SiteActivations:
    """Run ``ids`` ``(batch, seq)`` through the model with nnsight and return both sites of the given layers.

    Without ``with_logits`` the run stops right after the last needed MLP.
    """
    blocks = model.envoy_blocks()
    resid, mlp, out = [], [], {}
    with model.envoy.trace(ids.to(model.device)) as tracer:
        for layer in range(layer_start, layer_stop):
            block = blocks[layer]
            resid.append(getattr(block, model.sites.pre_mlp_norm).input.save())
            mlp.append(getattr(block, model.sites.mlp).output.save())
        if with_logits:
            out["logits"] = model.envoy.output.logits.save()
        else:
            tracer.stop()  # nothing after the last needed MLP runs
    return SiteActivations(torch.stack(resid, 2), torch.stack(mlp, 2), out.get("logits"))


class HarvestResult(NamedTuple):
    """What ``harvest`` did."""

    path: Path
    """The finished HDF5 file."""
    n_tokens: int
    """Rows stored."""
    seconds: float
    """Wall time of this call (0 when an identical finished file was reused)."""
    reused: bool
    """True when a finished file with the same arguments was already there."""

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else float("nan")


def _provenance(config: HarvestConfig, model: LoadedModel, layer_start: int, layer_stop: int) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.model,
        "corpus": config.corpus,
        "split": config.split,
        "layer_start": layer_start,
        "layer_stop": layer_stop,
        "d_model": model.d_model,
        "dtype": config.dtype,
        "seq_len": config.seq_len,
        "n_tokens": config.n_tokens,
        "tokenizer": f"{type(model.tokenizer).__name__}(vocab={len(model.tokenizer)})",
        "bos_token_id": model.bos_token_id,
        "config": json.dumps(dataclasses.asdict(config)),
        "cltlab_version": __version__,
    }


def harvest(
    config: HarvestConfig,
    path: str | Path,
    *,
    model: LoadedModel | None = None,
    device: str | None = None,
    progress: bool = True,
) -> HarvestResult:
    """Harvest ``config.n_tokens`` rows of activations into ``path``.

    A finished file with the same arguments is reused; a file with different arguments is never overwritten.
    """
    path = Path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model or load_model(config.model, dtype=config.model_dtype, device=device)
    layer_start, layer_stop = config.layers or (0, model.n_layers)
    if layer_stop > model.n_layers:
        raise ValueError(f"layers {config.layers} exceed the {model.n_layers} layers of {config.model!r}.")
    meta = _provenance(config, model, layer_start, layer_stop)
    if path.exists():
        existing = read_info(path, require_complete=False)
        same = all(existing.get(k) == v for k, v in meta.items() if k not in ("config", "cltlab_version"))
        if not same:
            changed = [
                k for k, v in meta.items() if k not in ("config", "cltlab_version") and existing.get(k) != v
            ]
            raise ValueError(
                f"{path} was harvested with different arguments ({', '.join(changed)}); "
                "delete it or choose another path."
            )
        if existing.get("complete"):
            log.info("Reusing finished harvest %s", path)
            return HarvestResult(path, int(existing["n_written"]), 0.0, True)
        path.unlink()  # an unfinished first-version file: start again

    start_time = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    n, L, d, T = config.n_tokens, layer_stop - layer_start, model.d_model, config.seq_len
    rows_per_batch = config.batch_size * (T - 1)
    n_sequences = -(-n // rows_per_batch) * config.batch_size  # every sequence of every batch used
    storage = STORAGE_DTYPES[config.dtype]
    chunk_rows = int(np.clip(2**21 // (L * d * np.dtype(storage).itemsize), 1, n))  # ~2 MiB chunks
    sums = torch.zeros(2, L, d, dtype=torch.float64)  # Σx per site
    squares = torch.zeros(2, L, dtype=torch.float64)  # Σ‖x‖² per site
    generator = torch.Generator().manual_seed(0)
    batches = token_sequences(
        config.corpus,
        model.tokenizer,
        seq_len=T,
        bos_token_id=model.bos_token_id,
        split=config.split,
        batch_size=config.batch_size,
    )
    with h5py.File(path, "w") as f:
        for key, value in meta.items():
            f.attrs[key] = value
        f.attrs["complete"] = False
        f.attrs["n_written"] = 0
        for site in ("resid_mid", "mlp_out"):
            f.create_dataset(site, shape=(n, L, d), dtype=storage, chunks=(chunk_rows, L, d))
        f.create_dataset("tokens", shape=(n,), dtype=np.int32)
        f.create_dataset("sequence", shape=(n,), dtype=np.int64)
        f.create_dataset("position", shape=(n,), dtype=np.int32)
        f.create_dataset("sequences", shape=(n_sequences, T), dtype=np.int32)
        written = 0
        bar = tqdm(total=n, unit="tok", desc=f"harvest {config.model}", disable=not progress)
        for batch_index in itertools.count():
            if written >= n:
                break
            ids = next(batches, None)
            if ids is None:
                raise ValueError(
                    f"Corpus {config.corpus!r} ({config.split}) ran out after {written} of {n} tokens; ask for fewer."
                )
            acts = trace_sites(model, ids, layer_start, layer_stop)
            take = min(rows_per_batch, n - written)
            order = torch.randperm(rows_per_batch, generator=generator)[:take]  # pre-shuffle within the batch
            rows = slice(written, written + take)
            first_seq = batch_index * config.batch_size
            for s, site in enumerate((acts.resid_mid, acts.mlp_out)):
                flat = site[:, 1:].reshape(rows_per_batch, L, d)[
                    order
                ]  # (take, n_layers, d_model), BOS dropped
                f[SiteActivations._fields[s]][rows] = to_storage(flat, config.dtype)
                flat64 = flat.double().cpu()
                sums[s] += flat64.sum(0)
                squares[s] += flat64.pow(2).sum((0, 2))
            seq_ids = torch.arange(first_seq, first_seq + config.batch_size).repeat_interleave(T - 1)
            positions = torch.arange(1, T).repeat(config.batch_size)
            f["tokens"][rows] = ids[:, 1:].reshape(-1)[order].numpy()
            f["sequence"][rows] = seq_ids[order].numpy()
            f["position"][rows] = positions[order].numpy()
            f["sequences"][first_seq : first_seq + config.batch_size] = ids.numpy()
            written += take
            f.attrs["n_written"] = written
            bar.update(take)
        bar.close()
        stats = f.create_group("stats")
        for s, prefix in enumerate(("input", "output")):
            mean = sums[s] / n  # (n_layers, d_model)
            variance = (
                squares[s] / n - mean.pow(2).sum(-1)
            ) / d  # per-element variance, averaged over d_model
            stats[f"{prefix}_mean"] = mean.float().numpy()
            stats[f"{prefix}_scale"] = variance.clamp_min(1e-12).sqrt().float().reshape(L, 1).numpy()
        f.attrs["complete"] = True
    seconds = time.perf_counter() - start_time
    log.info("Harvested %d tokens in %.1f s into %s", n, seconds, path)
    return HarvestResult(path, n, seconds, False)
