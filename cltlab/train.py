"""Training: a thin LightningModule around the CLT, and a Trainer factory.

Lightning owns the loop, devices, precision, checkpoints and logging; this file only says what one step is.
Metrics always go to CSV (``<run>/logs/version_N/metrics.csv``, read back by the plots); Weights & Biases logging is on
by default and offline unless you are logged in (``wandb login`` or ``WANDB_API_KEY``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .buffer import ActivationBatch, DiscBuffer
from .clt import CrossLayerTranscoder
from .config import CLTConfig, TrainConfig

log = logging.getLogger("cltlab")


class CLTModule(L.LightningModule):
    """Trains a ``CrossLayerTranscoder``; built from plain dicts so ``load_from_checkpoint`` can rebuild it."""

    def __init__(self, clt_config: dict, train_config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.clt = CrossLayerTranscoder(CLTConfig(**clt_config))
        self.cfg = TrainConfig(**train_config)
        # Tokens since each feature last fired, for the dead-feature fraction.
        self.register_buffer("tokens_since_active", torch.zeros(self.clt.n_layers, self.clt.d_features))
        self.register_buffer("tokens_seen", torch.zeros(()))

    def sparsity_coef(self) -> float:
        """λ, ramped linearly from 0 over the warm-up fraction of training."""
        warmup = self.cfg.sparsity_warmup * self.cfg.max_steps
        return (
            self.cfg.sparsity_coef * min(1.0, self.global_step / warmup)
            if warmup > 0
            else self.cfg.sparsity_coef
        )

    def training_step(self, batch: ActivationBatch, batch_idx: int) -> torch.Tensor:
        x, y = batch.resid_mid.float(), batch.mlp_out.float()  # (batch, n_layers, d_model)
        lam = self.sparsity_coef()
        out = self.clt.loss(
            x, y, sparsity_coef=lam, sparsity_c=self.cfg.sparsity_c, preact_coef=self.cfg.preact_coef
        )
        if not torch.isfinite(out.total):
            raise FloatingPointError(
                f"Loss became {out.total.item()} at step {self.global_step}; lower the learning rate "
                "(the last checkpoint is kept)."
            )
        self.tokens_seen += x.shape[0]
        self.tokens_since_active += x.shape[0]
        self.tokens_since_active[out.active] = 0
        if self.global_step % self.cfg.log_every == 0:
            self.log_metrics(out, lam)
        return out.total

    def dead_fraction(self) -> float:
        """Fraction of features that have not fired within the last ``dead_window`` tokens (or ever, early on)."""
        window = min(float(self.cfg.dead_window), float(self.tokens_seen))
        return (self.tokens_since_active >= window).float().mean().item()

    def log_metrics(self, out, lam: float) -> None:
        metrics = {
            "loss": out.total.detach(),
            "mse": out.mse.detach(),
            "sparsity": out.sparsity.detach(),
            "preact": out.preact.detach(),
            "lambda": lam,
            "dead_frac": self.dead_fraction(),
        }
        for layer in range(self.clt.n_layers):
            metrics[f"nmse/layer_{layer}"] = out.nmse[layer]
            metrics[f"l0/layer_{layer}"] = out.l0[layer]
        self.log_dict(metrics, on_step=True, prog_bar=False)
        self.log_dict({"nmse": out.nmse.mean(), "l0": out.l0.mean()}, on_step=True, prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(
            self.clt.parameters(), lr=self.cfg.lr, fused=True
        )  # fused on CPU and GPU
        decay_start = int(0.8 * self.cfg.max_steps)

        def schedule(step: int) -> float:  # constant, then linear decay to 0 over the last 20%
            return (
                1.0
                if step < decay_start
                else max(0.0, (self.cfg.max_steps - step) / (self.cfg.max_steps - decay_start))
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def wandb_logged_in() -> bool:
    """True when a W&B API key is configured (then runs sync online)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_trainer(config: TrainConfig, run_dir: str | Path, **overrides) -> L.Trainer:
    """A Lightning Trainer for ``config``: device chosen automatically, CSV (+ W&B) logs and checkpoints under ``run_dir``."""
    run_dir = Path(run_dir)
    loggers = [CSVLogger(run_dir, name="logs")]  # one version_N folder per call; see plots.read_metrics
    if config.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project="cltlab", save_dir=str(run_dir), offline=not wandb_logged_in(), name=run_dir.name
            )
        )
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=config.checkpoint_every,
        save_last=True,
        save_top_k=-1,
    )
    kwargs = dict(
        max_steps=config.max_steps,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=1,
        precision=config.precision,
        logger=loggers,
        callbacks=[checkpoints],
        log_every_n_steps=config.log_every,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


class TrainResult(NamedTuple):
    """What ``train`` produced."""

    clt: CrossLayerTranscoder
    """The trained transcoder (on the CPU, eval mode)."""
    clt_dir: Path
    """Where it was saved (safetensors + config.json)."""
    log_dir: Path
    """The CSV logs (``version_N/metrics.csv``, one per call; ``plots.read_metrics`` joins them)."""
    checkpoint_dir: Path
    """Lightning checkpoints (for resuming)."""


def train(
    config: TrainConfig,
    buffer_path: str | Path | torch.utils.data.IterableDataset,
    run_dir: str | Path,
    *,
    resume: bool = False,
    **trainer_overrides,
) -> TrainResult:
    """Train a CLT (or a per-layer transcoder) on a harvested buffer; save it to ``<run_dir>/clt``.

    ``buffer_path`` may also be an IterableDataset with ``n_layers``, ``d_model``, ``layer_start`` and ``stats``,
    e.g. ``cltlab.ActivationClient(url).dataset(batch_size)`` reading from an activation server.
    """
    run_dir = Path(run_dir)
    L.seed_everything(config.seed, verbose=False)
    streamed = isinstance(buffer_path, torch.utils.data.IterableDataset)
    buffer = (
        buffer_path if streamed else DiscBuffer(buffer_path, batch_size=config.batch_size, seed=config.seed)
    )
    clt_config = CLTConfig(
        n_layers=buffer.n_layers,
        d_model=buffer.d_model,
        d_features=config.d_features,
        cross_layer=config.cross_layer,
        threshold_init=config.threshold_init,
        bandwidth=config.bandwidth,
        layer_offset=buffer.layer_start,
    )
    module = CLTModule(dataclasses.asdict(clt_config), dataclasses.asdict(config))
    module.clt.set_normalization(*buffer.stats)
    loader = torch.utils.data.DataLoader(
        buffer,
        batch_size=None,
        shuffle=not streamed,  # a stream comes in the server's order
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    trainer = make_trainer(config, run_dir, **trainer_overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None)
    finally:
        for logger in trainer.loggers:  # close the W&B run so the next train() in this kernel starts its own
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.finish()
    clt = module.clt.float().cpu().eval()
    clt_dir = clt.save(run_dir / "clt")
    log.info("Saved the CLT to %s", clt_dir)
    return TrainResult(clt, clt_dir, run_dir / "logs", run_dir / "checkpoints")
