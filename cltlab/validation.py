"""Replacement metrics on held-out text while a CLT trains: a Lightning callback.

Every ``TrainerConfig.val_every`` steps, and after the last, the CLT being trained replaces the model's MLPs on
``val_sequences`` held-out sequences (the corpus's ``eval`` split) and ``cltlab.evaluate`` measures it: KL and
top-1 agreement with the original model, CE loss recovered, and NMSE and L0 per layer. They are logged as
``val/kl``, ``val/top1``, ``val/ce_recovered``, ``val/nmse``, ``val/l0`` and ``val/nmse/layer_<i>``,
``val/l0/layer_<i>`` at the step they follow, to the run's CSV (and W&B) beside the training metrics;
``plots.training_curves`` draws them.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from .config import EvalConfig
from .models import LoadedModel, load_model
from .replacement import HeldOut, ReplacementMetrics

log = logging.getLogger("cltlab")


class ReplacementValidation(L.Callback):
    """Evaluate the training CLT as a replacement model every ``every`` steps and after the last one.

    ``model`` is a ``LoadedModel`` or a model name, loaded on the training device when training starts, or the
    ``held_out`` of an earlier stage's validation, whose model, sequences and kept original runs are then used as
    they are (the end-to-end stage takes over the MSE stage's). Rank 0 alone evaluates (the others wait for
    it at their next collective). ``batch_size`` None is 2 sequences on a CPU, where it measured fastest (a
    batch's float32 logits over a large vocabulary, 25 MB a sequence at 49,152 tokens, are mapped fresh each
    time they are bigger than glibc's largest reused block; 8 sequences of 128 tokens: 5.7–6.4 s at 2, 7–8 s at 4,
    6.5–8 s at 1), and 16 elsewhere.
    """

    def __init__(
        self,
        model: LoadedModel | str | HeldOut,
        *,
        corpus: str,
        seq_len: int,
        every: int,
        n_sequences: int = 8,
        batch_size: int | None = None,
        step_offset: int = 0,
    ):
        if every <= 0 or n_sequences <= 0:
            raise ValueError(f"every and n_sequences must be positive, not {every} and {n_sequences}.")
        self.model, self.corpus, self.seq_len, self.every = model, corpus, seq_len, every
        self.n_sequences, self.batch_size = n_sequences, batch_size
        self.step_offset = step_offset  # added to the trainer's step: a later stage continues the curves
        self.last_step = -1
        # the sequences, with the original runs on them from the first validation on
        self.held_out = model if isinstance(model, HeldOut) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.held_out is not None:
            return
        if isinstance(self.model, str):
            self.model = load_model(self.model, device=pl_module.device)
        elif self.model.device != pl_module.device:
            raise ValueError(
                f"The validation model is on {self.model.device} but the CLT trains on {pl_module.device}; "
                "load it there, or pass its name and it is loaded there."
            )
        batch_size = self.batch_size or (2 if pl_module.device.type == "cpu" else 16)
        config = EvalConfig(n_sequences=self.n_sequences, batch_size=min(batch_size, self.n_sequences))
        self.held_out = HeldOut(
            self.model, corpus=self.corpus, seq_len=self.seq_len, config=config, keep=True
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every == 0:
            self.validate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validate(trainer, pl_module)

    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the CLT as it is now and log the figures at the current step (once per step)."""
        step = trainer.global_step
        if step == self.last_step or not trainer.is_global_zero:
            return
        self.last_step = step
        clt = pl_module.clt
        training, start = clt.training, time.perf_counter()
        try:
            metrics = self.held_out.score(clt, progress=False)
        finally:
            clt.train(training)
        figures = logged_figures(metrics)
        figures["val/seconds"] = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=self.step_offset + step)
        log.info(
            "step %d: held-out KL %.3f, top-1 %.3f, CE recovered %.3f",
            self.step_offset + step,
            metrics.kl,
            metrics.top1_agreement,
            metrics.ce_recovered,
        )


def logged_figures(metrics: ReplacementMetrics) -> dict[str, float]:
    """``metrics`` under the names the validation logs them by."""
    n = len(metrics.nmse)
    figures = {
        "val/kl": metrics.kl,
        "val/top1": metrics.top1_agreement,
        "val/ce_recovered": metrics.ce_recovered,
        "val/nmse": sum(metrics.nmse) / n,
        "val/l0": metrics.mean_l0,
    }
    for layer in range(n):
        figures[f"val/nmse/layer_{layer}"] = metrics.nmse[layer]
        figures[f"val/l0/layer_{layer}"] = metrics.l0[layer]
    return figures
