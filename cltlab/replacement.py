"""The replacement model: the language model with its MLPs swapped for the CLT, and how much it keeps.

The LM runs under nnsight. Layer by layer, the CLT encodes the replacement model's *own* ``resid_mid`` and its
reconstruction replaces the MLP's output, so errors compound through depth as they would in use. BOS positions
keep their original MLP outputs: the CLT is not trained on them (see ``harvest.py``), and every variant,
zero-ablation included, treats them the same way so the comparison is fair.

With ``error_correction=True`` the reconstruction error measured on the original run is added back, which must
reproduce the original logits exactly (up to float rounding): the test of the plumbing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attribution import AttributionGraph, attribute
from .clt import CrossLayerTranscoder, LayerDecoder
from .config import EvalConfig
from .corpus import token_sequences
from .models import LoadedModel
from .precision import available_memory
from .sites import SiteActivations, trace_sites

log = logging.getLogger("cltlab")


class ReplacementMetrics(NamedTuple):
    """How much of the original model the replacement keeps, on held-out tokens."""

    ce_original: float
    """Next-token cross-entropy of the original model (nats)."""
    ce_replacement: float
    """Of the replacement model."""
    ce_zero_ablation: float
    """Of the model with the covered MLP outputs set to zero."""
    ce_recovered: float
    """(ce_zero − ce_replacement) / (ce_zero − ce_original): 1 is perfect, 0 no better than ablation."""
    kl: float
    """Mean KL(original ‖ replacement) of the next-token distributions (nats)."""
    top1_agreement: float
    """Fraction of positions where both models' most likely next token is the same."""
    nmse: list[float]
    """Per covered layer: ‖reconstruction − mlp_out‖² ÷ variance of mlp_out, on the original run."""
    l0: list[float]
    """Per covered layer: mean active features per token."""
    n_tokens: int
    """Predicted positions the figures average over."""

    @property
    def mean_l0(self) -> float:
        return sum(self.l0) / len(self.l0)

    def summary(self) -> str:
        nmse = " ".join(f"{v:.3f}" for v in self.nmse)
        l0 = " ".join(f"{v:.1f}" for v in self.l0)
        return (
            f"CE original {self.ce_original:.4f} | replacement {self.ce_replacement:.4f} | "
            f"zero-ablation {self.ce_zero_ablation:.4f} | CE recovered {self.ce_recovered:.4f}\n"
            f"KL {self.kl:.4f} | top-1 agreement {self.top1_agreement:.4f} | mean L0 {self.mean_l0:.1f} "
            f"| {self.n_tokens} tokens\n"
            f"NMSE per layer: {nmse}\nL0 per layer:   {l0}"
        )

    def to_dict(self) -> dict:
        return {**self._asdict(), "mean_l0": self.mean_l0}


class ReplacementRun(NamedTuple):
    """One forward pass of the replacement model, as ``ReplacementModel.run`` records it."""

    logits: torch.Tensor
    """``(batch, seq, vocab)`` the replacement model's logits."""
    features: torch.Tensor
    """``(batch, seq, n_layers, d_features)`` the CLT features, each layer encoded from the replacement's own
    ``resid_mid``."""
    mlp_out: torch.Tensor
    """``(batch, seq, n_layers, d_model)`` what each original MLP outputs on the replacement's residual stream."""
    reconstruction: torch.Tensor
    """``(batch, seq, n_layers, d_model)`` what the CLT wrote in its place (at BOS the MLP output passes
    through instead)."""


class ReplacementModel:
    """A language model whose covered MLPs are replaced by a CLT.

    Attributes:
        model: the ``LoadedModel``.
        clt: the transcoder; it covers model layers ``clt.config.layer_offset`` onwards.
    """

    def __init__(self, model: LoadedModel, clt: CrossLayerTranscoder):
        offset, n = clt.config.layer_offset, clt.n_layers
        if clt.d_model != model.d_model or offset + n > model.n_layers:
            raise ValueError(
                f"The CLT (layers {offset}–{offset + n - 1}, d_model {clt.d_model}) does not fit {model.name!r} "
                f"({model.n_layers} layers, d_model {model.d_model}); train it on activations of this model."
            )
        self.model = model
        self.clt = clt.to(model.device).eval()
        self.layers = range(offset, offset + n)

    @torch.no_grad()
    def logits(
        self, ids: torch.Tensor, *, mode: str = "replacement", errors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of one variant: ``original``, ``replacement`` or ``zero_ablation``.

        ``errors`` ``(batch, seq, n_layers, d_model)`` are added to the replacement's MLP outputs.
        """
        if mode not in ("original", "replacement", "zero_ablation"):
            raise ValueError(f"mode must be original, replacement or zero_ablation, not {mode!r}.")
        ids = ids.to(self.model.device)
        if mode == "original":
            return self.model.model(ids).logits.float()
        return self._trace(ids, zero=mode == "zero_ablation", errors=errors, record=False).logits

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> ReplacementRun:
        """The replacement model on ``ids`` ``(batch, seq)``, with its features and, per layer, the CLT's output
        beside what the model's own MLP computes from the same (replacement) residual stream."""
        return self._trace(ids.to(self.model.device), zero=False, errors=None, record=True)

    def trace(
        self, ids: torch.Tensor, *, record: bool = False, bos: torch.Tensor | None = None
    ) -> ReplacementRun:
        """The replacement model on ``ids`` with autograd on, for training through it (``cltlab.finetune``): the
        logits' gradients reach every CLT parameter through the frozen model. ``record`` also runs the original
        MLPs on the replacement's residual stream and returns their outputs beside the reconstructions (else
        ``features``, ``mlp_out`` and ``reconstruction`` are None and the covered MLPs are not run). ``bos``, the
        covered MLPs' outputs at position 0 ``(batch, 1, n_layers, d_model)`` from an original run of the same
        ids (``sites.trace_sites``), saves the run of position 0 that otherwise gives them."""
        return self._trace(ids.to(self.model.device), zero=False, errors=None, record=record, bos=bos)

    def _trace(
        self,
        ids: torch.Tensor,
        *,
        zero: bool,
        errors: torch.Tensor | None,
        record: bool,
        bos: torch.Tensor | None = None,
    ) -> ReplacementRun:
        """One replacement (or zero-ablated) run. Unless ``record`` asks for what the MLPs compute, the covered
        MLPs are skipped, not run and overwritten (three quarters of a small model's layer FLOPs): their BOS
        outputs, which every variant keeps, come from ``bos`` or a run of position 0 alone, which sees only
        itself. Each layer's features are a tensor of their own, so that autograd can follow the pass where it
        is on."""
        blocks, sites, clt = self.model.envoy_blocks(), self.model.sites, self.clt
        decoder = LayerDecoder(clt)
        if record:
            bos = None
        elif bos is None:
            bos = trace_sites(self.model, ids[:, :1], self.layers.start, self.layers.stop).mlp_out
        elif bos.shape != (ids.shape[0], 1, len(self.layers), self.model.d_model):
            raise ValueError(
                f"bos must be the MLP outputs at position 0, (batch, 1, n_layers, d_model) = "
                f"{(ids.shape[0], 1, len(self.layers), self.model.d_model)}, not {tuple(bos.shape)}."
            )
        mlp_out, reconstruction, out = [], [], {}
        with self.model.envoy.trace(ids):
            for i, layer in enumerate(self.layers):
                block = blocks[layer]
                mlp = getattr(block, sites.mlp)
                x = getattr(block, sites.pre_mlp_norm).input  # (batch, seq, d_model)
                if zero:
                    new = torch.zeros(x.shape, device=x.device)
                else:
                    new = decoder.add(clt.encode_layer(x.float(), i))  # (batch, seq, d_model)
                    if errors is not None:
                        new = new + errors[:, :, i].to(new.device)
                if bos is not None:
                    new[:, 0] = bos[:, 0, i]  # BOS passes through
                    mlp.skip(new.to(x.dtype))
                    continue
                original = mlp.output
                mlp_out.append(original.float().clone())
                reconstruction.append(new.float().clone())
                new[:, 0] = original[:, 0]  # BOS passes through
                mlp.output = new.to(original.dtype)
            out["logits"] = self.model.envoy.output.logits.save()
        stack = (lambda parts: torch.stack(parts, 2)) if record else (lambda parts: None)
        return ReplacementRun(
            out["logits"].float(), stack(decoder.features), stack(mlp_out), stack(reconstruction)
        )

    def attribute(self, prompt: str | list[int] | torch.Tensor, **options) -> AttributionGraph:
        """The attribution graph of ``prompt`` through this CLT (``cltlab.attribute``; same options)."""
        return attribute(self.model, self.clt, prompt, **options)

    @torch.no_grad()
    def reconstruction_errors(self, ids: torch.Tensor) -> torch.Tensor:
        """``mlp_out − CLT(resid_mid)`` on the original run, ``(batch, seq, n_layers, d_model)``."""
        acts = trace_sites(self.model, ids, self.layers.start, self.layers.stop)
        batch, seq = ids.shape
        x = acts.resid_mid.float().flatten(0, 1)  # (batch·seq, n_layers, d_model)
        recon = self.clt(x).reconstruction.view(batch, seq, self.clt.n_layers, -1)
        return acts.mlp_out.float() - recon


class _Reference(NamedTuple):
    """One batch of held-out sequences with what every replacement is scored against: the original model's run
    (its next-token log-probabilities after BOS and its MLPs' sites) and both fixed variants' summed CE."""

    ids: torch.Tensor
    targets: torch.Tensor
    """``(positions,)`` the next tokens predicted from positions 1 … seq − 2 (BOS excluded)."""
    log_p: torch.Tensor
    """``(positions, vocab)`` float32: the original model's log-probabilities there."""
    top1: torch.Tensor
    """``(positions,)`` its likeliest tokens."""
    sites: SiteActivations
    ce_original: float
    ce_zero_ablation: float


class HeldOut:
    """The corpus's held-out (``eval``) sequences, against which ``score`` measures CLTs as replacement models.

    The original model's and the zero-ablated model's runs do not depend on the CLT, so with ``keep=True`` they are
    kept from the first ``score`` and a later one runs the replacement model alone: the validation callback scores
    the training CLT on the same sequences every N steps (``config.n_sequences`` × seq_len × vocab float32
    log-probabilities are kept: 200 MB for 8 sequences of 128 tokens over smollm2's 49,152 tokens). Runs that
    would take more than a quarter of the memory available on the model's device are not kept (with a warning):
    every ``score`` then runs the original model again.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        corpus: str,
        seq_len: int,
        config: EvalConfig | None = None,
        keep: bool = False,
    ):
        self.model, self.corpus, self.seq_len = model, corpus, seq_len
        self.config = config or EvalConfig()
        self.keep = keep
        self._kept: tuple[range, list[_Reference]] | None = None  # the covered layers they were measured for

    @torch.no_grad()
    def score(self, clt: CrossLayerTranscoder, *, progress: bool = True) -> ReplacementMetrics:
        """Compare the original, replacement and zero-ablated model on the held-out sequences."""
        replacement = ReplacementModel(self.model, clt)
        kept = self._kept is not None and self._kept[0] == replacement.layers
        references = iter(self._kept[1]) if kept else self._references(replacement)
        totals = dict(ce_original=0.0, ce_replacement=0.0, ce_zero_ablation=0.0, kl=0.0, top1=0.0)
        L = clt.n_layers
        local = dict(
            err_sq=torch.zeros(L),
            target_sum=torch.zeros(L, clt.d_model),
            target_sq=torch.zeros(L),
            l0_sum=torch.zeros(L),
        )
        n_pred = n_rows = 0
        bar = tqdm(total=self.config.n_sequences, desc="evaluate", unit="seq", disable=not progress)
        collecting = self.keep and not kept  # this score's references, to keep for the next
        new, budget = [], available_memory(self.model.device) // 4 if collecting else 0
        for reference in references:
            if collecting:
                new.append(reference)
                budget -= _nbytes(reference)
                if budget < 0:
                    log.warning(
                        "The held-out sequences' original runs would take more than a quarter of the memory "
                        "available on %s: not kept (each score runs the original model again).",
                        self.model.device,
                    )
                    self.keep = collecting = False
                    new = []
            bar.update(len(reference.ids))
            n_pred += _score_logits(totals, reference, replacement.logits(reference.ids))
            n_rows += _score_reconstruction(local, replacement.clt, reference.sites)
        bar.close()
        if n_pred == 0:
            raise ValueError(f"Corpus {self.corpus!r} has no eval sequences of length {self.seq_len}.")
        if collecting:
            self._kept = (replacement.layers, new)
        variance = local["target_sq"] - local["target_sum"].pow(2).sum(-1) / n_rows
        ce = {mode: totals[f"ce_{mode}"] / n_pred for mode in ("original", "replacement", "zero_ablation")}
        gap = ce["zero_ablation"] - ce["original"]
        return ReplacementMetrics(
            ce_original=ce["original"],
            ce_replacement=ce["replacement"],
            ce_zero_ablation=ce["zero_ablation"],
            ce_recovered=(ce["zero_ablation"] - ce["replacement"]) / gap if gap else float("nan"),
            kl=totals["kl"] / n_pred,
            top1_agreement=totals["top1"] / n_pred,
            nmse=(local["err_sq"] / variance.clamp_min(1e-12)).tolist(),
            l0=(local["l0_sum"] / n_rows).tolist(),
            n_tokens=n_pred,
        )

    def _references(self, replacement: ReplacementModel) -> Iterator[_Reference]:
        """The held-out batches with the original and zero-ablated runs on them, one batch at a time."""
        model, n = self.model, self.config.n_sequences
        batches = token_sequences(
            self.corpus,
            model.tokenizer,
            seq_len=self.seq_len,
            bos_token_id=model.bos_token_id,
            split="eval",
            batch_size=self.config.batch_size,
        )
        seen = 0
        for ids in batches:
            if seen >= n:
                return
            ids = ids[: n - seen].to(model.device)
            seen += len(ids)
            original = trace_sites(
                model, ids, replacement.layers.start, replacement.layers.stop, with_logits=True
            )
            targets = ids[:, 2:].reshape(-1)
            log_p = _next_token_log_p(original.logits)
            zero = _next_token_log_p(replacement.logits(ids, mode="zero_ablation"))
            yield _Reference(
                ids,
                targets,
                log_p,
                log_p.argmax(-1),
                original._replace(logits=None),
                ce_original=F.nll_loss(log_p, targets, reduction="sum").item(),
                ce_zero_ablation=F.nll_loss(zero, targets, reduction="sum").item(),
            )


def _nbytes(reference: _Reference) -> int:
    tensors = (
        reference.log_p,
        reference.top1,
        reference.targets,
        reference.sites.resid_mid,
        reference.sites.mlp_out,
    )
    return sum(t.nelement() * t.element_size() for t in tensors)


def evaluate(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    *,
    corpus: str,
    seq_len: int,
    config: EvalConfig | None = None,
    progress: bool = True,
) -> ReplacementMetrics:
    """Compare original, replacement and zero-ablated model on ``config.n_sequences`` held-out sequences."""
    return HeldOut(model, corpus=corpus, seq_len=seq_len, config=config).score(clt, progress=progress)


def _next_token_log_p(logits: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, vocab)`` logits → float32 log-probabilities ``(positions, vocab)`` at positions 1 … seq − 2,
    the ones whose next token is known (BOS excluded)."""
    return F.log_softmax(logits[:, 1:-1].float(), -1).flatten(0, 1)


def _score_logits(totals: dict[str, float], reference: _Reference, logits: torch.Tensor) -> int:
    """Add one batch's summed next-token CE of each mode, KL and top-1 agreement of the replacement's ``logits``
    to ``totals``; return the positions it predicted."""
    log_q = _next_token_log_p(logits)
    totals["ce_original"] += reference.ce_original
    totals["ce_zero_ablation"] += reference.ce_zero_ablation
    totals["ce_replacement"] += F.nll_loss(log_q, reference.targets, reduction="sum").item()
    totals["kl"] += F.kl_div(log_q, reference.log_p, log_target=True, reduction="sum").item()
    totals["top1"] += (reference.top1 == log_q.argmax(-1)).sum().item()
    return reference.targets.numel()


def _score_reconstruction(
    local: dict[str, torch.Tensor], clt: CrossLayerTranscoder, original: SiteActivations
) -> int:
    """Add one batch's local reconstruction sums on the original run (BOS excluded) to ``local``; return its rows."""
    x = original.resid_mid[:, 1:].float().flatten(0, 1).to(clt.W_enc.device)  # (rows, n_layers, d_model)
    y = original.mlp_out[:, 1:].float().flatten(0, 1).to(clt.W_enc.device).cpu()
    out = clt(x)
    local["err_sq"] += (out.reconstruction.cpu() - y).pow(2).sum((0, 2))
    local["target_sum"] += y.sum(0)
    local["target_sq"] += y.pow(2).sum((0, 2))
    local["l0_sum"] += (out.features > 0).sum(-1).float().sum(0).cpu()
    return y.shape[0]
