"""DiscBuffer: harvested activations in one HDF5 file, read back as shuffled training batches.

File layout (format ``cltlab.activations``, version 1)::

    resid_mid  (n_tokens, n_layers, d_model)  float16/bfloat16-as-uint16/float32, chunked by rows
    mlp_out    (n_tokens, n_layers, d_model)  same
    tokens     (n_tokens,)      int32  token id of each row
    sequence   (n_tokens,)      int64  index of the row's sequence in ``sequences``
    position   (n_tokens,)      int32  the row's position in that sequence (0 is BOS, never stored)
    sequences  (n_sequences, seq_len) int32  every harvested sequence, BOS included, for feature contexts
    stats/     input_mean (n_layers, d_model), input_scale (n_layers, 1), output_mean, output_scale  float32
    attrs      format, format_version, model, corpus, split, layer_start, layer_stop, d_model, dtype, seq_len,
               tokenizer, bos_token_id, n_written, complete

Rows are shuffled at harvest time within each forward batch, so a contiguous block of rows already mixes many
sequences and positions. Reading takes whole contiguous blocks in random order and shuffles each block in
memory: random row gathers (``ds[sorted_random_indices]``) read HDF5 at a hundredth of block speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

FORMAT = "cltlab.activations"
FORMAT_VERSION = 1
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bf16 bits as uint16


class ActivationBatch(NamedTuple):
    """One training batch, in the storage dtype (convert on the device)."""

    resid_mid: torch.Tensor
    """``(batch, n_layers, d_model)`` MLP inputs (before the pre-MLP norm)."""
    mlp_out: torch.Tensor
    """``(batch, n_layers, d_model)`` MLP outputs."""


class TokenContext(NamedTuple):
    """A window of token ids around one stored row."""

    ids: list[int]
    """Token ids of the window, in sequence order."""
    index: int
    """Position of the row's own token in ``ids``."""


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


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array → tensor of the stored dtype (bfloat16 is kept as its uint16 bits on disk)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def to_storage(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor → numpy array in the storage dtype."""
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return tensor.to(getattr(torch, dtype)).cpu().numpy()


class DiscBuffer(torch.utils.data.Dataset):
    """Shuffled batches of harvested activations from an HDF5 file written by ``cltlab.harvest``.

    Item ``i`` is a whole batch (use ``DataLoader(buffer, batch_size=None, shuffle=True)``): the rows of one
    contiguous block, shuffled in memory. Each DataLoader worker opens its own h5py handle.

    Attributes:
        path: the HDF5 file.
        batch_size: rows per batch (the last partial block is dropped).
        info: the file's provenance attributes.
        n_tokens, n_layers, d_model, layer_start: shape of the stored activations.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 1024, seed: int = 0):
        self.path = Path(path)
        self.batch_size = batch_size
        self.seed = seed
        self.info = read_info(self.path)
        self.n_tokens = int(self.info["n_written"])
        self.layer_start = int(self.info["layer_start"])
        self.n_layers = int(self.info["layer_stop"]) - self.layer_start
        self.d_model = int(self.info["d_model"])
        if self.n_tokens < batch_size:
            raise ValueError(
                f"{self.path} holds {self.n_tokens} tokens, fewer than one batch of {batch_size}."
            )
        self._file: h5py.File | None = None

    # h5py handles do not survive fork or pickling: every process opens its own on first use.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self.n_tokens // self.batch_size

    def __getitem__(self, index: int) -> ActivationBatch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        start = index * self.batch_size
        resid, mlp = self.read(start, start + self.batch_size)
        order = torch.randperm(
            self.batch_size, generator=torch.Generator().manual_seed(self.seed * 100_003 + index)
        )
        return ActivationBatch(resid[order], mlp[order])

    def read(self, start: int, stop: int) -> ActivationBatch:
        """Rows ``[start, stop)`` in file order, in the storage dtype."""
        dtype = self.info["dtype"]
        return ActivationBatch(
            to_torch(self.file["resid_mid"][start:stop], dtype),
            to_torch(self.file["mlp_out"][start:stop], dtype),
        )

    @property
    def stats(self) -> NormStats:
        group = self.file["stats"]
        return NormStats(*(torch.from_numpy(group[name][()]) for name in NormStats._fields))

    def token_info(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens, sequence, position)`` arrays for rows ``[start, stop)``."""
        stop = self.n_tokens if stop is None else stop
        return (
            self.file["tokens"][start:stop],
            self.file["sequence"][start:stop],
            self.file["position"][start:stop],
        )

    @property
    def sequences(self) -> np.ndarray:
        """``(n_sequences, seq_len)`` token ids of every harvested sequence."""
        return self.file["sequences"][()]

    def context(self, row: int, *, before: int = 8, after: int = 4) -> TokenContext:
        """The tokens around row ``row`` in its sequence (BOS excluded), for showing where a feature fires."""
        seq, pos = int(self.file["sequence"][row]), int(self.file["position"][row])
        ids = self.file["sequences"][seq]
        start = max(1, pos - before)
        return TokenContext(ids[start : pos + 1 + after].tolist(), pos - start)

    def check_compatible(self, n_layers: int, d_model: int, *, what: str = "the CLT") -> None:
        """Raise a clear error when this buffer cannot feed a model of ``n_layers`` × ``d_model``."""
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise ValueError(
                f"{self.path} holds {self.n_layers} layers of d_model {self.d_model}, but {what} has "
                f"{n_layers} layers of d_model {d_model}; harvest again for this model or pick the matching buffer."
            )

    def summary(self) -> str:
        """One line of provenance."""
        i = self.info
        size = self.path.stat().st_size / 2**30
        return (
            f"DiscBuffer {self.path.name}: {self.n_tokens:,} tokens × layers {self.layer_start}–"
            f"{self.layer_start + self.n_layers - 1} × d_model {self.d_model} ({i['dtype']}, {size:.2f} GiB) "
            f"of {i['model']} on {i['corpus']}/{i['split']}, seq_len {i['seq_len']}, format v{i['format_version']}"
        )

    def __repr__(self) -> str:
        return self.summary()


def read_info(path: str | Path, *, require_complete: bool = True) -> dict:
    """Validate an activation file and return its attributes; every failure is one clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No activation buffer at {path}: harvest one first (notebook 01_harvest or `cltlab harvest`)."
        )
    try:
        with h5py.File(path, "r") as f:
            info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            datasets = set(f.keys())
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {err}") from None
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cltlab activation buffer (format {info.get('format')!r}).")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has buffer format version {info.get('format_version')}; this cltlab reads version "
            f"{FORMAT_VERSION}. Harvest it again with this version."
        )
    missing = {"resid_mid", "mlp_out", "tokens", "stats"} - datasets
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: the file is damaged; harvest it again.")
    if require_complete and not info.get("complete"):
        raise ValueError(
            f"{path} is an unfinished harvest ({info.get('n_written', 0)} of {info.get('n_tokens')} tokens); "
            "run the same harvest again to finish it."
        )
    info["config"] = json.loads(info.get("config", "{}"))
    return info
