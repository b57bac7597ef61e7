"""End-to-end fine-tuning: the CLT learns what the replacement model predicts, not only each MLP's output.

The MSE stage (``training.py``) fits every layer's MLP output on the original model's activations. Errors of the
same size matter very differently downstream, and in the replacement model they compound through depth: on the
default profile, seeds with equal per-layer errors gave KL 3.5 and 5.4 nats. This stage runs the replacement model
(``replacement.ReplacementModel.trace``: each covered MLP replaced by the CLT, which encodes the replacement's own
``resid_mid``) on training text and minimises KL(original ‖ replacement) of the next-token distributions, with
gradients through the frozen language model into every CLT parameter (the end-to-end objective of Braun et al.
2024, "Identifying functionally important features with end-to-end sparse dictionary learning", applied to a CLT
that the MSE stage already trained). ``kl_mse_coef`` adds each layer's local reconstruction error on the original
run (the MSE stage's objective, on the same text), which keeps the features reconstructing the MLPs that
attribution graphs read. One original run of a step's sequences gives the targets of both terms; the replacement
run skips the covered MLPs. With ``kl_text_sequences`` the stage reads a fixed pool of sequences for several
epochs and keeps each one's original run (``Teacher``: the likeliest ``KEPT_TOKENS`` of each next-token
distribution, and the local term's sites) from the first: a later step runs only the replacement model (the
original run was a quarter of a step on the default profile).

Lightning runs the loop (one device); metrics go to the run's CSV (and W&B) as ``e2e/kl`` and ``e2e/local_mse``,
at steps after the MSE stage's, so ``plots.training_curves`` continues the curves. It is not resumable: a resumed
``train`` repeats it from the MSE stage's last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .clt import CrossLayerTranscoder
from .config import FinetuneConfig, TrainerConfig
from .corpus import token_sequences
from .models import LoadedModel, load_model
from .precision import available_memory, model_dtype, resolve_device, uses_cpu
from .replacement import HeldOut, ReplacementModel
from .sites import trace_sites

# A pooled stage keeps the original's likeliest tokens at each position, the rest of the mass as one outcome
# (``kl_divergence``): 1 MB a sequence of 128 tokens, against 12.5 MB for the whole of smollm2's vocabulary in bf16.
KEPT_TOKENS = 1024
# The local error term reads every 4th position, a quarter of the CLT's pass on the batch. On the default profile
# (120 steps) it held the mean NMSE at 0.65, against 0.73 for the same weight on every position of the
# replacement's own stream, at the same KL.
LOCAL_STRIDE = 4


class TrainingText(torch.utils.data.IterableDataset):
    """Batches ``(ids, keys)`` of a corpus's training split: ``ids`` ``(batch_size, seq_len)``, round and round.

    With ``pool`` it reads only the split's first ``pool`` sequences, in a new order each epoch (the global torch
    generator's, which ``trainer.seed`` seeds), and ``keys`` ``(batch_size,)`` are their numbers, by which the fine-tune
    keeps the original run of each; without it the text is fresh at every step and ``keys`` is None.
    """

    def __init__(
        self,
        corpus: str,
        tokenizer,
        *,
        seq_len: int,
        bos_token_id: int,
        batch_size: int,
        pool: int | None = None,
    ):
        if pool is not None and pool < batch_size:
            raise ValueError(f"A pool of {pool} sequences cannot fill batches of {batch_size}.")
        self.corpus, self.tokenizer, self.batch_size, self.pool = corpus, tokenizer, batch_size, pool
        self.seq_len, self.bos_token_id = seq_len, bos_token_id

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.pool is None:
            while True:
                empty = True
                for batch in self._batches(self.batch_size):
                    empty = False
                    yield batch, None
                if empty:
                    self._too_short(self.batch_size, "kl_sequences")
        sequences = next(iter(self._batches(self.pool)), None)  # the split's first pool sequences
        if sequences is None:
            self._too_short(self.pool, "kl_text_sequences")
        while True:
            order = torch.randperm(self.pool)
            for start in range(0, self.pool - self.batch_size + 1, self.batch_size):
                keys = order[start : start + self.batch_size]
                yield sequences[keys], keys

    def _batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        return token_sequences(
            self.corpus,
            self.tokenizer,
            seq_len=self.seq_len,
            bos_token_id=self.bos_token_id,
            split="train",
            batch_size=batch_size,
        )

    def _too_short(self, n: int, field: str):
        raise ValueError(
            f"Corpus {self.corpus!r} has fewer than {n} training sequences of {self.seq_len} tokens: "
            f"lower finetune.{field}."
        )


class Teacher(NamedTuple):
    """What a step needs of the original run on its sequences (BOS dropped but from ``bos``)."""

    log_p: torch.Tensor
    """``(batch, seq_len - 1, vocab or KEPT_TOKENS)`` float32: the next-token log-probabilities after BOS, of the
    whole vocabulary, or of the likeliest ``KEPT_TOKENS`` (``tokens``)."""
    tokens: torch.Tensor | None
    """``(batch, seq_len - 1, KEPT_TOKENS)``: the tokens of ``log_p``, or None where it covers the vocabulary."""
    resid_mid: torch.Tensor
    """``(batch, rows, n_layers, d_model)`` at every ``LOCAL_STRIDE``-th position after BOS (the model's dtype)."""
    mlp_out: torch.Tensor
    """As ``resid_mid``."""
    bos: torch.Tensor
    """``(batch, 1, n_layers, d_model)``: the MLPs' outputs at BOS, which the replacement run takes as they are."""


class KeptRuns:
    """The original runs (``Teacher``) of a pool's sequences, by key, each part in one block of ``pool`` rows
    allocated at the first ``put``."""

    def __init__(self, pool: int):
        self.pool = pool
        self.parts: Teacher | None = None
        self.kept = torch.zeros(pool, dtype=torch.bool)

    def get(self, keys: torch.Tensor) -> Teacher | None:
        """The kept runs of ``keys`` (stacked in their order), or None unless every one is kept."""
        if self.parts is None or not self.kept[keys.cpu()].all():
            return None
        return Teacher(*(part[keys.to(part.device)] for part in self.parts))

    def put(self, keys: torch.Tensor, teacher: Teacher) -> None:
        if self.parts is None:
            self.parts = Teacher(
                *(torch.empty((self.pool, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in teacher)
            )
        for part, values in zip(self.parts, teacher, strict=True):
            part[keys.to(part.device)] = values
        self.kept[keys.cpu()] = True


def kl_divergence(log_p: torch.Tensor, tokens: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) averaged over positions, q = softmax(``logits``) ``(..., vocab)``, p given by ``log_p`` over the
    vocabulary (``tokens`` None) or over ``tokens`` alone. Then the rest of each distribution's mass counts as one
    outcome: the KL of the two coarsened distributions, at most the full one, and equal to it when ``tokens`` hold all
    of p's mass."""
    log_p, logits = log_p.flatten(0, -2), logits.flatten(0, -2)
    p = log_p.exp()
    if tokens is None:
        # KL(p ‖ q) = H(p, q) − H(p); the soft-target cross-entropy takes about half the passes over the
        # (positions × vocabulary) logits of log_softmax + kl_div, forward and backward.
        return F.cross_entropy(logits, p) + (p * log_p).sum(-1).mean()
    log_q = F.log_softmax(logits.float(), -1).gather(-1, tokens.flatten(0, -2).long())
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = -torch.expm1(torch.logsumexp(log_q, -1))  # 1 − Σ q over the tokens
    rest = torch.xlogy(p_rest, p_rest) - p_rest * q_rest.clamp(min=torch.finfo(q_rest.dtype).tiny).log()
    return ((p * (log_p - log_q)).sum(-1) + rest).mean()


class FinetuneModule(L.LightningModule):
    """One fine-tuning step: KL(original ‖ replacement) (+ ``kl_mse_coef`` × local error) on a batch of ids."""

    def __init__(self, replacement: ReplacementModel, config: FinetuneConfig, step_offset: int = 0):
        super().__init__()
        self.clt, self.cfg, self.step_offset = replacement.clt, config, step_offset
        self.replacement = replacement  # not a Module: the frozen model stays where it was loaded
        self.clt.train()  # ReplacementModel put it in eval mode
        self.started: float | None = None  # when the first step began (the time budget's clock)
        # the original run of each pooled sequence, by its key
        self.kept = KeptRuns(config.kl_text_sequences) if config.kl_text_sequences else None

    def on_train_start(self) -> None:
        self.started = time.monotonic()

    def progress(self, step: int) -> float:
        """How far the stage is, in steps: ``step``, or, when ``kl_max_minutes`` would stop it first, the share of
        that budget spent × ``kl_steps``. The learning rate then still decays to 0 when a slow machine runs out of
        time before ``kl_steps``; a machine that keeps pace with the budget gets the step schedule exactly."""
        if self.cfg.kl_max_minutes is None or self.started is None:
            return float(step)
        spent = (time.monotonic() - self.started) / (60.0 * self.cfg.kl_max_minutes)
        return max(float(step), spent * self.cfg.kl_steps)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor | None], batch_idx: int) -> torch.Tensor:
        ids, keys = batch
        teacher = self.teacher(ids, keys)
        with self.attention():
            run = self.replacement.trace(ids, bos=teacher.bos)  # the covered MLPs are skipped, not run
        # position 0 (BOS) is the original's
        kl = kl_divergence(teacher.log_p, teacher.tokens, run.logits[:, 1:])
        figures = {"e2e/kl": kl.item()}
        loss = kl
        if self.cfg.kl_mse_coef > 0:
            local_mse = self.local_error(teacher)
            loss = loss + self.cfg.kl_mse_coef * local_mse
            figures["e2e/local_mse"] = local_mse.item()
        for logger in self.trainer.loggers:
            logger.log_metrics(figures, step=self.step_offset + self.global_step + 1)
        self.log("kl", kl, prog_bar=True, logger=False)
        return loss

    def attention(self) -> contextlib.AbstractContextManager:
        """The attention kernel of the replacement run: on a CPU PyTorch's composite ("math") one, whose backward
        is a few batched matmuls; the fused CPU kernel's backward took a fifth of a step on the default profile
        (4 ms a layer for 2 × 128 tokens), and the step ran ~7% slower with it."""
        if self.replacement.model.device.type != "cpu":
            return contextlib.nullcontext()
        return sdpa_kernel(SDPBackend.MATH)

    @torch.no_grad()
    def teacher(self, ids: torch.Tensor, keys: torch.Tensor | None) -> Teacher:
        """The original run's targets for ``ids``: one run of the whole model (both terms' targets), or, when
        every sequence's ``key`` was seen before, the kept ones. With a pool (``kl_text_sequences``) the targets
        are the likeliest ``KEPT_TOKENS`` of each distribution, and a sequence's are kept the first time."""
        pooled = self.kept is not None and keys is not None
        if pooled and (kept := self.kept.get(keys)) is not None:
            return kept
        model = self.replacement
        original = trace_sites(model.model, ids, model.layers.start, model.layers.stop, with_logits=True)
        log_p, tokens = F.log_softmax(original.logits[:, 1:].float(), -1), None
        if self.kept is not None:
            log_p, tokens = log_p.topk(min(KEPT_TOKENS, log_p.shape[-1]), -1)
            tokens = tokens.int()
        teacher = Teacher(
            log_p,
            tokens,
            original.resid_mid[:, 1::LOCAL_STRIDE],
            original.mlp_out[:, 1::LOCAL_STRIDE],
            original.mlp_out[:, :1],
        )
        if pooled:
            self.kept.put(keys, teacher)
        return teacher

    def local_error(self, teacher: Teacher) -> torch.Tensor:
        """The CLT's squared error (normalized units, summed over ``d_model``, averaged over rows and layers)
        against the MLPs on the original run, at every ``LOCAL_STRIDE``-th position after BOS: the MSE stage's
        loss without its penalties (whose ``mse`` also averages over ``d_model``)."""
        x, y = teacher.resid_mid.flatten(0, 1), teacher.mlp_out.flatten(0, 1)  # (rows, n_layers, d_model)
        return self.clt.loss(x, y, sparsity_coef=0.0, preact_coef=0.0).mse * self.clt.d_model

    def configure_optimizers(self):
        from .training import lr_factor

        # The thresholds stay as the MSE stage left them (this loss has no sparsity term to hold L0 down):
        # ``encode_layer`` gives them no pseudo-gradient.
        cfg = self.cfg
        weights = [p for name, p in self.clt.named_parameters() if not name.startswith("activation.")]
        rest = [p for p in weights if p is not self.clt.W_enc]
        groups = [{"params": rest}, {"params": [self.clt.W_enc], "lr": cfg.kl_lr * cfg.kl_encoder_lr_scale}]
        optimizer = torch.optim.Adam(groups, lr=cfg.kl_lr, fused=True)

        def schedule(step: int) -> float:
            return lr_factor(
                self.progress(step),
                max_steps=cfg.kl_steps,
                warmup_steps=cfg.kl_warmup_steps,
                decay=cfg.kl_lr_decay,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def finetune(
    clt: CrossLayerTranscoder,
    *,
    model: str | LoadedModel,
    corpus: str,
    seq_len: int,
    config: FinetuneConfig,
    run_dir: str | Path,
    trainer_config: TrainerConfig | None = None,
    step_offset: int = 0,
    held_out: HeldOut | None = None,
    **trainer_overrides,
) -> CrossLayerTranscoder:
    """Fine-tune ``clt`` (in place) end to end on ``model`` reading ``corpus``'s training split in sequences of
    ``seq_len``; return it on the CPU in eval mode. ``model`` is a ``LoadedModel`` on the training device, or a
    registry name or hub id, then loaded there (in bfloat16 where that is fast; validation loads it in float32, as
    ``evaluate`` is usually run).

    ``trainer_config`` gives the accelerator, logging and validation (every ``val_every`` steps, and after the last
    one, on ``val_sequences`` held-out sequences); ``step_offset`` is where the logged steps start (the MSE
    stage's last step); ``held_out``, the MSE stage validation's, is validated against as it is (its model and
    kept original runs), instead of loading the model and running it again. ``trainer_overrides`` go to the
    Lightning Trainer.
    """
    from .training import finish_wandb, fit, make_trainer
    from .validation import ReplacementValidation

    if config.kl_steps <= 0:
        raise ValueError(f"finetune needs config.kl_steps > 0, not {config.kl_steps}.")
    trainer_config = trainer_config or TrainerConfig()
    # A LoadedModel is used as it is (validation then runs on it too).
    lm = model if isinstance(model, LoadedModel) else _frozen_model(model, trainer_config.accelerator)
    module = FinetuneModule(ReplacementModel(lm, clt), config, step_offset)
    _check_pool_memory(module.replacement, seq_len, config.kl_text_sequences)
    text = TrainingText(
        corpus,
        lm.tokenizer,
        seq_len=seq_len,
        bos_token_id=lm.bos_token_id,
        batch_size=config.kl_sequences,
        pool=config.kl_text_sequences,
    )
    callbacks = list(trainer_overrides.pop("callbacks", []))
    if trainer_config.val_every:
        callbacks.append(
            ReplacementValidation(
                held_out or model,
                corpus=corpus,
                seq_len=seq_len,
                every=trainer_config.val_every,
                n_sequences=trainer_config.val_sequences,
                step_offset=step_offset,
            )
        )
    if config.kl_max_minutes is not None:
        trainer_overrides.setdefault("max_time", datetime.timedelta(minutes=config.kl_max_minutes))
    stage = _stage_config(trainer_config, config, lm)
    trainer = make_trainer(stage, run_dir, checkpoints=False, callbacks=callbacks, **trainer_overrides)
    try:
        fit(trainer, module, train_dataloaders=torch.utils.data.DataLoader(text, batch_size=None))
    finally:
        finish_wandb(trainer)
    return clt.float().cpu().eval()


def _frozen_model(name: str, accelerator: str) -> LoadedModel:
    """The model ``name`` on the device Lightning's ``accelerator`` trains on, in bfloat16 where that is fast."""
    device = torch.device("cpu") if uses_cpu(None, accelerator) else resolve_device()
    return load_model(name, dtype=model_dtype("bfloat16", device), device=device)


def _stage_config(trainer_config: TrainerConfig, config: FinetuneConfig, lm: LoadedModel) -> TrainerConfig:
    """The MSE stage's trainer config for this stage: its steps, every step logged, on the model's one device; the
    CLT in bf16-mixed precision when the model runs in bf16 (where that is fast), else in float32."""
    bf16 = next(lm.model.parameters()).dtype == torch.bfloat16
    return dataclasses.replace(
        trainer_config,
        max_steps=config.kl_steps,
        # The CLT's encoder and decoder matmuls are a large share of the step's work; the model runs as loaded.
        precision="bf16-mixed" if bf16 else "32-true",
        accelerator="cpu" if lm.device.type == "cpu" else "gpu",
        log_every=1,
        checkpoint_every=config.kl_steps,
        devices=1,
        num_nodes=1,
        strategy="auto",
    )


def _check_pool_memory(replacement: ReplacementModel, seq_len: int, pool: int | None) -> None:
    """Refuse a ``kl_text_sequences`` whose kept original runs (``Teacher``) would take more than half the memory
    available now on the model's device."""
    if pool is None:
        return
    lm, clt = replacement.model, replacement.clt
    dtype = next(lm.model.parameters()).dtype
    tokens = min(KEPT_TOKENS, lm.model.config.vocab_size)
    rows = len(range(1, seq_len, LOCAL_STRIDE)) * 2 + 1  # resid_mid and mlp_out, and BOS
    per_token = 4 + 4  # a float32 log-probability and an int32 token
    need = pool * ((seq_len - 1) * tokens * per_token + rows * clt.n_layers * clt.d_model * dtype.itemsize)
    available = available_memory(lm.device)
    if need > available / 2:
        raise ValueError(
            f"finetune.kl_text_sequences={pool} would keep {need / 2**30:.1f} GiB of the original model's runs, "
            f"more than half the {available / 2**30:.1f} GiB available on {lm.device}: lower it."
        )
