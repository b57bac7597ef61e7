"""The two sites a CLT reads and writes, ``resid_mid`` and ``mlp_out``: how they are captured from a model, how a
row of them is stored, the block of rows every producer hands out (``ActivationBatch``), and the normalization
statistics measured on them.

Where the sites live in each architecture is ``models.ARCHITECTURES``; this module traces them with nnsight. A
row is one token's ``(n_layers, d_model)`` vector of one site, stored in a storage dtype (``store.STORAGE_DTYPES``:
bfloat16 is kept as its uint16 bits, since numpy has no bfloat16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .store import STORAGE_DTYPES

if TYPE_CHECKING:
    from .models import LoadedModel


# ---------------------------------------------------------------------------------------------- capture


class SiteActivations(NamedTuple):
    """Activations of the two sites for a batch of sequences, as a forward pass captures them.

    Not a block of rows (that is ``ActivationBatch``): the tensors keep the ``(batch, seq)`` axes (BOS included)
    and the model's dtype, and may carry the logits. Harvesting and the live source flatten them into rows.
    """

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
    resid, mlp, logits = trace_layers(model, ids, layer_start, layer_stop, with_logits=with_logits)
    return SiteActivations(torch.stack(resid, 2), torch.stack(mlp, 2), logits)


@torch.no_grad()
def trace_layers(
    model: LoadedModel, ids: torch.Tensor, layer_start: int, layer_stop: int, *, with_logits: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """``trace_sites`` before stacking: ``resid_mid`` and ``mlp_out`` as per-layer lists of ``(batch, seq,
    d_model)`` tensors, and the logits or None."""
    blocks = model.envoy_blocks()
    resid, mlp, out = [], [], {}
    with model.envoy.trace(ids.to(model.device), use_cache=False) as tracer:
        for layer in range(layer_start, layer_stop):
            block = blocks[layer]
            resid.append(getattr(block, model.sites.pre_mlp_norm).input.save())
            mlp.append(getattr(block, model.sites.mlp).output.save())
        if with_logits:
            out["logits"] = model.envoy.output.logits.save()
        else:
            tracer.stop()  # nothing after the last needed MLP runs
    return resid, mlp, out.get("logits")


# ---------------------------------------------------------------------------------------------- rows


class ActivationBatch(NamedTuple):
    """A block of rows of both sites, in the storage dtype (convert on the device).

    What the DiscBuffer, the activation server's client and the data module hand to training; a row is one token.
    """

    resid_mid: torch.Tensor
    """``(rows, n_layers, d_model)`` MLP inputs (before the pre-MLP norm)."""
    mlp_out: torch.Tensor
    """``(rows, n_layers, d_model)`` MLP outputs."""
    index: int | None = None
    """The block's index in its producer's sequence of batches (the server's cursor, a DiscBuffer's batch
    number); None for rows read by position (``DiscBuffer.read``)."""


# ---------------------------------------------------------------------------------------------- storage


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a storage dtype name (``bfloat16`` is ``torch.bfloat16``, not its stored bits)."""
    return getattr(torch, dtype)


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array → tensor of the stored dtype, sharing its memory (bfloat16 is kept as uint16 bits on disk)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_storage(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Tensor → tensor whose numpy view has the storage dtype (a view when ``tensor`` has the stored dtype)."""
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.uint16)
    return tensor.to(torch_dtype(dtype))


def row_bytes(n_layers: int, d_model: int, dtype: str) -> int:
    """Bytes of one stored row of one site: ``n_layers × d_model`` values of the storage dtype ``dtype``."""
    return n_layers * d_model * np.dtype(STORAGE_DTYPES[dtype]).itemsize


# ---------------------------------------------------------------------------------------------- statistics


class NormStats(NamedTuple):
    """Per-layer normalization statistics measured at harvest time."""

    input_mean: torch.Tensor
    """``(n_layers, d_model)``"""
    input_scale: torch.Tensor
    """``(n_layers, 1)``: RMS over d_model of the centred ``resid_mid``."""
    output_mean: torch.Tensor
    """``(n_layers, d_model)``"""
    output_scale: torch.Tensor
    """``(n_layers, 1)``"""


class NormAccumulator:
    """Running sums from which ``NormStats`` are computed: float32 within a block of rows, float64 across blocks.

    Attributes:
        sums: ``(2, n_layers, d_model)`` Σx of ``resid_mid`` and ``mlp_out``.
        squares: ``(2, n_layers)`` Σ‖x‖² over d_model.
        rows: how many rows of each site the sums cover.
    """

    def __init__(self, n_layers: int, d_model: int):
        self.d_model = d_model
        self.sums = np.zeros((2, n_layers, d_model))
        self.squares = np.zeros((2, n_layers))
        self.rows = 0

    def add(self, site: int, x: torch.Tensor) -> None:
        """Add the rows ``x`` ``(rows, n_layers, d_model)`` of site ``site`` (0: resid_mid, 1: mlp_out)."""
        self.sums[site] += x.sum(0, dtype=torch.float32).double().numpy()
        norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # (rows, n_layers)
        self.squares[site] += norms.square().sum(0, dtype=torch.float64).numpy()
        self.rows += len(x) if site == 0 else 0

    def merge(self, sums: np.ndarray, squares: np.ndarray, rows: int) -> None:
        """Add sums measured elsewhere (a shard's ``stats_sum``, ``stats_sq`` and ``stats_rows``)."""
        self.sums += sums
        self.squares += squares
        self.rows += rows

    def stats(self) -> NormStats | None:
        """Mean and RMS scale per layer of both sites (None before any row was added)."""
        if self.rows == 0:
            return None
        mean = self.sums / self.rows
        variance = (self.squares / self.rows - (mean**2).sum(-1)) / self.d_model
        scale = np.sqrt(np.maximum(variance, 1e-24))[..., None]

        def f32(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.float32))

        return NormStats(f32(mean[0]), f32(scale[0]), f32(mean[1]), f32(scale[1]))
