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
attribution graphs read. One original run per step gives the targets of both terms; the replacement run skips the
covered MLPs.

Lightning runs the loop (one device); metrics go to the run's CSV (and W&B) as ``e2e/kl`` and ``e2e/local_mse``,
at steps after the MSE stage's, so ``plots.training_curves`` continues the curves. It is not resumable: a resumed
``train`` repeats it from the MSE stage's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from .clt import CrossLayerTranscoder
from .config import FinetuneConfig, TrainerConfig
from .corpus import token_sequences
from .models import LoadedModel, load_model
from .precision import model_dtype, resolve_device, uses_cpu
from .replacement import ReplacementModel
from .sites import SiteActivations, trace_sites

# The local error term reads every 4th position, a quarter of the CLT's pass on the batch. On the default profile
# (120 steps) it held the mean NMSE at 0.65, against 0.73 for the same weight on every position of the
# replacement's own stream, at the same KL.
LOCAL_STRIDE = 4


class TrainingText(torch.utils.data.IterableDataset):
    """Batches ``(batch_size, seq_len)`` of a corpus's training split, round and round."""

    def __init__(self, corpus: str, tokenizer, *, seq_len: int, bos_token_id: int, batch_size: int):
        self.corpus, self.tokenizer, self.batch_size = corpus, tokenizer, batch_size
        self.seq_len, self.bos_token_id = seq_len, bos_token_id

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            batches = token_sequences(
                self.corpus,
                self.tokenizer,
                seq_len=self.seq_len,
                bos_token_id=self.bos_token_id,
                split="train",
                batch_size=self.batch_size,
            )
            empty = True
            for batch in batches:
                empty = False
                yield batch
            if empty:
                raise ValueError(
                    f"Corpus {self.corpus!r} has fewer than {self.batch_size} training sequences of "
                    f"{self.seq_len} tokens: lower finetune.kl_sequences."
                )


class FinetuneModule(L.LightningModule):
    """One fine-tuning step: KL(original ‖ replacement) (+ ``kl_mse_coef`` × local error) on a batch of ids."""

    def __init__(self, replacement: ReplacementModel, config: FinetuneConfig, step_offset: int = 0):
        super().__init__()
        self.clt, self.cfg, self.step_offset = replacement.clt, config, step_offset
        self.replacement = replacement  # not a Module: the frozen model stays where it was loaded
        self.clt.train()  # ReplacementModel put it in eval mode
        self.started: float | None = None  # when the first step began (the time budget's clock)

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

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        replacement = self.replacement
        with torch.no_grad():  # one original run gives the targets of both terms
            original = trace_sites(
                replacement.model, ids, replacement.layers.start, replacement.layers.stop, with_logits=True
            )
            log_p = F.log_softmax(original.logits[:, 1:].float(), -1).flatten(0, 1)
            p = log_p.exp()
            entropy = -(p * log_p).sum(-1).mean()
        run = replacement.trace(ids, bos=original.mlp_out[:, :1])  # the covered MLPs are skipped, not run
        # KL(p ‖ q) = H(p, q) − H(p); the soft-target cross-entropy takes about half the passes over the
        # (positions × vocabulary) logits of log_softmax + kl_div, forward and backward. Position 0 (BOS) is
        # the original's.
        kl = F.cross_entropy(run.logits[:, 1:].flatten(0, 1), p) - entropy
        figures = {"e2e/kl": kl.item()}
        loss = kl
        if self.cfg.kl_mse_coef > 0:
            local_mse = self.local_error(original)
            loss = loss + self.cfg.kl_mse_coef * local_mse
            figures["e2e/local_mse"] = local_mse.item()
        for logger in self.trainer.loggers:
            logger.log_metrics(figures, step=self.step_offset + self.global_step + 1)
        self.log("kl", kl, prog_bar=True, logger=False)
        return loss

    def local_error(self, original: SiteActivations) -> torch.Tensor:
        """The CLT's squared error (normalized units, summed over ``d_model``, averaged over rows and layers)
        against the MLPs on the original run, at every ``LOCAL_STRIDE``-th position after BOS: the MSE stage's
        loss without its penalties (whose ``mse`` also averages over ``d_model``)."""
        x = original.resid_mid[:, 1::LOCAL_STRIDE].flatten(0, 1)  # (rows, n_layers, d_model)
        y = original.mlp_out[:, 1::LOCAL_STRIDE].flatten(0, 1)
        return self.clt.loss(x, y, sparsity_coef=0.0, preact_coef=0.0).mse * self.clt.d_model

    def configure_optimizers(self):
        from .training import lr_factor

        # The thresholds stay as the MSE stage left them (this loss has no sparsity term to hold L0 down):
        # ``encode_layer`` gives them no pseudo-gradient.
        weights = [p for name, p in self.clt.named_parameters() if not name.startswith("activation.")]
        optimizer = torch.optim.Adam(weights, lr=self.cfg.kl_lr, fused=True)
        cfg = self.cfg

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
    **trainer_overrides,
) -> CrossLayerTranscoder:
    """Fine-tune ``clt`` (in place) end to end on ``model`` reading ``corpus``'s training split in sequences of
    ``seq_len``; return it on the CPU in eval mode. ``model`` is a ``LoadedModel`` on the training device, or a
    registry name or hub id, then loaded there (in bfloat16 where that is fast; validation loads it in float32, as
    ``evaluate`` is usually run).

    ``trainer_config`` gives the accelerator, logging and validation (every ``val_every`` steps, and after the last
    one, on ``val_sequences`` held-out sequences); ``step_offset`` is where the logged steps start (the MSE
    stage's last step). ``trainer_overrides`` go to the Lightning Trainer.
    """
    from .training import finish_wandb, fit, make_trainer
    from .validation import ReplacementValidation

    if config.kl_steps <= 0:
        raise ValueError(f"finetune needs config.kl_steps > 0, not {config.kl_steps}.")
    trainer_config = trainer_config or TrainerConfig()
    # A LoadedModel is used as it is (validation then runs on it too).
    lm = model if isinstance(model, LoadedModel) else _frozen_model(model, trainer_config.accelerator)
    module = FinetuneModule(ReplacementModel(lm, clt), config, step_offset)
    text = TrainingText(
        corpus, lm.tokenizer, seq_len=seq_len, bos_token_id=lm.bos_token_id, batch_size=config.kl_sequences
    )
    callbacks = list(trainer_overrides.pop("callbacks", []))
    if trainer_config.val_every:
        validation = ReplacementValidation(
            model,
            corpus=corpus,
            seq_len=seq_len,
            every=trainer_config.val_every,
            n_sequences=trainer_config.val_sequences,
            step_offset=step_offset,
        )
        callbacks.append(validation)
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
