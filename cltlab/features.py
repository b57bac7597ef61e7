"""Feature statistics from one streaming pass over a DiscBuffer, kept beside the CLT and reloaded.

For every feature of every layer: how often it fires, its largest and mean activation, a histogram of its
activations on fixed log-spaced bins, and the buffer rows of its ``k`` largest activations (their text, a window
of tokens around each, is read back from the buffer by ``FeatureStatistics.contexts``). Memory is bounded by
``n_layers × d_features × (k + n_bins)`` however many tokens are read. Activations are in the CLT's own units
(pre-activations of the normalized ``resid_mid``), as ``CrossLayerTranscoder.encode_layer`` returns them.

With them, what a feature's page shows (``feature_pages``): contexts sampled from four bands of its activation
range, the features most correlated with it, every context's window of tokens with the feature's activation on
each, and, given the model, the output tokens each feature promotes and suppresses — so that the FeatureBrowser
and the exported dashboards show a feature without running the model.

``feature_statistics(..., save_dir=...)`` writes safetensors + JSON (conventionally ``<clt_dir>/feature_stats``)
and loads that instead of recomputing when the CLT's encoder, the buffer and the settings are the same; a folder
written by an older cltlab is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder
from .feature_effects import unembedding
from .feature_pages import WINDOW, band_samples, context_windows, logit_tables
from .models import LoadedModel

FORMAT = "cltlab.feature_stats"
FORMAT_VERSION = 2  # 2: the context windows and logit tables
LOG10_RANGE = (-3.0, 3.0)
"""Activation histograms cover 10^-3 … 10^3 on log-spaced bins; the end bins also take what lies beyond."""
SORT_KEYS = ("index", "frequency", "max_activation")


class LayerStatistics(NamedTuple):
    """Statistics of the features of one layer over ``n_tokens`` tokens."""

    layer: int
    """CLT layer index (model layer = layer + clt.config.layer_offset)."""
    frequency: torch.Tensor
    """``(d_features,)`` fraction of tokens on which the feature is active."""
    max_activation: torch.Tensor
    """``(d_features,)``"""
    mean_activation: torch.Tensor
    """``(d_features,)`` mean activation over the tokens where it is active."""
    top_values: torch.Tensor
    """``(d_features, k)`` largest activations, descending (0 where fewer than k tokens fired)."""
    top_rows: torch.Tensor
    """``(d_features, k)`` buffer rows of those activations (-1 where fewer than k tokens fired)."""
    n_tokens: int
    """Tokens read."""
    histogram: torch.Tensor | None = None
    """``(d_features, n_bins)`` counts of the activations in each bin of ``bin_edges``."""
    bin_edges: torch.Tensor | None = None
    """``(n_bins + 1,)`` activation values of the histogram's bin edges (log-spaced)."""

    def top_features(self, n: int = 5, *, by: str = "frequency") -> list[int]:
        """The ``n`` live features with the largest ``frequency`` or ``max_activation``."""
        score = getattr(self, by).clone()
        score[self.frequency == 0] = -1
        return score.argsort(descending=True)[:n].tolist()

    @property
    def dead_fraction(self) -> float:
        return (self.frequency == 0).float().mean().item()


class TopContext(NamedTuple):
    """One of a feature's top activations, with the tokens around it."""

    activation: float
    """The feature's activation on the token."""
    row: int
    """The token's row in the buffer."""
    ids: list[int]
    """Token ids of the window around it, in sequence order (BOS excluded)."""
    index: int
    """Position of the token in ``ids``."""


@dataclass(frozen=True)
class FeatureStatistics:
    """Statistics of every feature of every layer of a CLT over ``n_tokens`` buffer rows (CPU tensors)."""

    frequency: torch.Tensor
    """``(n_layers, d_features)`` fraction of tokens on which each feature is active (its density)."""
    max_activation: torch.Tensor
    """``(n_layers, d_features)``"""
    mean_activation: torch.Tensor
    """``(n_layers, d_features)`` mean over the tokens where the feature is active."""
    histogram: torch.Tensor
    """``(n_layers, d_features, n_bins)`` int32 counts of activations per bin of ``bin_edges``."""
    bin_edges: torch.Tensor
    """``(n_bins + 1,)`` log-spaced activation values (see ``LOG10_RANGE``)."""
    top_values: torch.Tensor
    """``(n_layers, d_features, k)`` largest activations, descending (0 where fewer than k tokens fired)."""
    top_rows: torch.Tensor
    """``(n_layers, d_features, k)`` their buffer rows (-1 where fewer than k tokens fired)."""
    n_tokens: int
    """Buffer rows read."""
    layer_offset: int = 0
    """Model layer of CLT layer 0."""
    reused: bool = False
    """True when loaded from ``save_dir`` instead of computed."""
    context_ids: torch.Tensor | None = None
    """``(n_layers, d_features, k + BANDS · per_band, window)`` int32 token ids around each top row (the first
    ``k``) and each band sample (``band_rows``, flattened), its own token at ``before`` (``feature_pages.Windows``;
    -1 outside the sequence)."""
    context_acts: torch.Tensor | None = None
    """Same shape: the feature's activation on each of those tokens (NaN where unknown)."""
    top_logit_ids: torch.Tensor | None = None
    """``(n_layers, d_features, n)`` output tokens each feature promotes most (``feature_pages.LogitTables``)."""
    top_logit_values: torch.Tensor | None = None
    bottom_logit_ids: torch.Tensor | None = None
    """The tokens it suppresses most, most negative first."""
    bottom_logit_values: torch.Tensor | None = None
    band_rows: torch.Tensor | None = None
    """``(n_layers, d_features, BANDS, per_band)`` rows sampled from each quarter of the feature's activation range,
    lowest first (``feature_pages.Samples``; -1 where a band has fewer)."""
    band_values: torch.Tensor | None = None
    correlated: torch.Tensor | None = None
    """``(n_layers, d_features, n)`` the same layer's features most correlated with it in activation."""
    correlation: torch.Tensor | None = None

    @property
    def before(self) -> int:
        """Tokens before the top token in each context window."""
        return WINDOW[0]

    @property
    def n_layers(self) -> int:
        return self.frequency.shape[0]

    @property
    def d_features(self) -> int:
        return self.frequency.shape[1]

    def layer(self, layer: int) -> LayerStatistics:
        """The statistics of one CLT layer."""
        return LayerStatistics(
            layer,
            self.frequency[layer],
            self.max_activation[layer],
            self.mean_activation[layer],
            self.top_values[layer],
            self.top_rows[layer],
            self.n_tokens,
            self.histogram[layer],
            self.bin_edges,
        )

    def is_dead(self, layer: int, feature: int) -> bool:
        """Whether the feature never fired on the tokens read."""
        return bool(self.frequency[layer, feature] == 0)

    def order(self, layer: int, by: str = "index") -> list[int]:
        """The features of ``layer`` by index, or by descending ``frequency`` / ``max_activation`` (dead last)."""
        if by not in SORT_KEYS:
            raise ValueError(f"by must be one of {SORT_KEYS}, not {by!r}.")
        if by == "index":
            return list(range(self.d_features))
        return getattr(self, by)[layer].argsort(descending=True, stable=True).tolist()

    def contexts(
        self, buffer: DiscBuffer, layer: int, feature: int, *, before: int = 8, after: int = 4
    ) -> list[TopContext]:
        """The feature's top activations, each with ``before`` tokens before it and ``after`` after it."""
        out = []
        for value, row in zip(
            self.top_values[layer, feature].tolist(), self.top_rows[layer, feature].tolist(), strict=True
        ):
            if row >= 0:
                ids, index = buffer.context(row, before=before, after=after)
                out.append(TopContext(value, row, list(ids), index))
        return out

    # ----------------------------------------------------------------------------------------- save / load

    TENSORS = (
        "frequency",
        "max_activation",
        "mean_activation",
        "histogram",
        "bin_edges",
        "top_values",
        "top_rows",
    )
    PAGE_TENSORS = (
        "context_ids",
        "context_acts",
        "top_logit_ids",
        "top_logit_values",
        "bottom_logit_ids",
        "bottom_logit_values",
        "band_rows",
        "band_values",
        "correlated",
        "correlation",
    )

    def save(self, directory: str | Path, key: dict | None = None) -> Path:
        """Write ``stats.safetensors`` and ``stats.json`` (format version, ``key`` identifying the inputs)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [*self.TENSORS, *(n for n in self.PAGE_TENSORS if getattr(self, n) is not None)]
        save_file(
            {name: getattr(self, name).contiguous() for name in names}, str(directory / "stats.safetensors")
        )
        meta = dict(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            n_tokens=self.n_tokens,
            layer_offset=self.layer_offset,
            key=key or {},
        )
        (directory / "stats.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FeatureStatistics:
        """Read statistics written by ``save`` (no pickle)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if meta is not None and meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / 'stats.json'} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                f"this cltlab reads version {FORMAT_VERSION}: compute them again with cltlab.feature_statistics(..., "
                "save_dir=...), which replaces them."
            )
        if meta is None:
            raise FileNotFoundError(
                f"No feature statistics in {directory}: compute them with cltlab.feature_statistics(..., "
                "save_dir=...)."
            )
        tensors = load_file(str(directory / "stats.safetensors"))
        return cls(**tensors, n_tokens=meta["n_tokens"], layer_offset=meta["layer_offset"], reused=True)


def _read_meta(directory: Path) -> dict | None:
    path = directory / "stats.json"
    if not path.exists() or not (directory / "stats.safetensors").exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} holds {meta.get('format')!r}, not feature statistics ({FORMAT!r}); pass another save_dir."
        )
    return meta


def clt_fingerprint(clt: CrossLayerTranscoder) -> str:
    """A hash of the CLT's weights (its activations decide the statistics, its decoder the logit tables)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(clt.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _stream(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    layers: list[int],
    *,
    k: int,
    n_bins: int,
    block_size: int,
    n: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Accumulate the statistics of ``layers`` over buffer rows ``[0, n)``."""
    L, F, device = len(layers), clt.d_features, clt.W_enc.device
    lo, hi = LOG10_RANGE
    per_bin = n_bins / (hi - lo)
    total = torch.zeros(L, F, dtype=torch.float64, device=device)
    peak = torch.zeros(L, F, device=device)
    histogram = torch.zeros(L, F, n_bins, dtype=torch.int32, device=device)
    top_values = torch.zeros(L, F, k, device=device)
    top_rows = torch.full((L, F, k), -1, dtype=torch.long, device=device)
    blocks = buffer.input_blocks(range(0, n, block_size), block_size, stop=n, device=device)
    for start, stop, resid in tqdm(  # resid: (block, n_layers, d_model)
        blocks, total=math.ceil(n / block_size), desc="feature statistics", disable=not progress
    ):
        for i, layer in enumerate(layers):
            f = clt.encode_layer(resid[:, layer], layer)  # (block, d_features)
            total[i] += f.sum(0)
            block_max = f.amax(0)  # (d_features,)
            torch.maximum(peak[i], block_max, out=peak[i])
            active = f > 0
            where = active.nonzero()  # (n_active, 2): row in block, feature
            bins = ((f[active].log10() - lo) * per_bin).long().clamp_(0, n_bins - 1)
            ones = torch.ones(len(bins), dtype=torch.int32, device=device)
            histogram[i].view(-1).index_add_(0, where[:, 1] * n_bins + bins, ones)
            # Top-k: only features whose block maximum beats their current k-th best take part.
            beat = (block_max > top_values[i, :, -1]).nonzero().squeeze(1)
            if len(beat):
                best = f[:, beat].topk(min(k, stop - start), dim=0)  # (k, n_beat)
                values = torch.cat([top_values[i, beat], best.values.T], 1)
                rows = torch.cat([top_rows[i, beat], best.indices.T + start], 1)
                merged = values.topk(k, dim=1)
                top_values[i, beat] = merged.values
                top_rows[i, beat] = rows.gather(1, merged.indices)
    top_rows[top_values <= 0] = -1
    count = histogram.sum(-1)
    return dict(
        frequency=(count / max(n, 1)).float().cpu(),
        max_activation=peak.cpu(),
        mean_activation=(total / count.clamp_min(1)).float().cpu(),
        histogram=histogram.cpu(),
        bin_edges=torch.logspace(lo, hi, n_bins + 1),
        top_values=top_values.cpu(),
        top_rows=top_rows.cpu(),
    )


def _check(clt: CrossLayerTranscoder, buffer: DiscBuffer, max_tokens: int | None) -> int:
    buffer.check_compatible(clt.n_layers, clt.d_model)
    return min(buffer.n_tokens, max_tokens or buffer.n_tokens)


def feature_statistics(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    *,
    k: int = 10,
    n_bins: int = 96,
    block_size: int = 4096,
    max_tokens: int | None = None,
    save_dir: str | Path | None = None,
    model: LoadedModel | None = None,
    progress: bool = True,
) -> FeatureStatistics:
    """Statistics of every feature of every layer, from one streaming pass over the first ``max_tokens`` rows,
    and what each feature's page shows: its top contexts' token windows with its activation on every token (a
    second pass over the blocks that hold them) and, with ``model``, its logit tables.

    With ``save_dir`` (conventionally ``<clt_dir>/feature_stats``), statistics saved there from the same CLT,
    buffer, model, ``k``, ``n_bins`` and token count are loaded instead; otherwise (or when an older cltlab wrote
    them) the new ones are saved there.
    """
    n = _check(clt, buffer, max_tokens)
    key = dict(
        clt=clt_fingerprint(clt),
        buffer=buffer.summary(),
        n_tokens=n,
        k=k,
        n_bins=n_bins,
        window=list(WINDOW),
        model=model.name if model is not None else None,
    )
    if save_dir is not None:
        meta = _read_meta(Path(save_dir))
        if meta is not None and meta.get("format_version") == FORMAT_VERSION and meta["key"] == key:
            return FeatureStatistics.load(save_dir)
    tensors = _stream(
        clt,
        buffer,
        list(range(clt.n_layers)),
        k=k,
        n_bins=n_bins,
        block_size=block_size,
        n=n,
        progress=progress,
    )
    samples = band_samples(clt, buffer, tensors["max_activation"], n=n, block_size=block_size)
    rows = torch.cat([tensors["top_rows"], samples.band_rows.flatten(2)], -1)
    windows = context_windows(clt, buffer, rows, n=n, block_size=block_size)
    pages = dict(context_ids=windows.ids, context_acts=windows.acts, **samples._asdict())
    if model is not None:
        tables = logit_tables(clt, unembedding(model))
        names = ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values")
        pages.update(zip(names, tables, strict=True))
    stats = FeatureStatistics(**tensors, **pages, n_tokens=n, layer_offset=clt.config.layer_offset)
    if save_dir is not None:
        stats.save(save_dir, key)
    return stats


def layer_statistics(
    clt: CrossLayerTranscoder,
    buffer: DiscBuffer,
    layer: int,
    *,
    k: int = 10,
    n_bins: int = 96,
    block_size: int = 4096,
    max_tokens: int | None = None,
    progress: bool = True,
) -> LayerStatistics:
    """Statistics of the features of one layer (the single-layer form of ``feature_statistics``)."""
    n = _check(clt, buffer, max_tokens)
    if not 0 <= layer < clt.n_layers:
        raise ValueError(f"layer must be in [0, {clt.n_layers}), not {layer}.")
    t = _stream(clt, buffer, [layer], k=k, n_bins=n_bins, block_size=block_size, n=n, progress=progress)
    stats = FeatureStatistics(**t, n_tokens=n, layer_offset=clt.config.layer_offset)
    return stats.layer(0)._replace(layer=layer)
