"""Training: a thin LightningModule around the CLT, and a Trainer factory.

Lightning owns the loop, devices, precision, checkpoints and logging; this file only says what one step is.
Metrics always go to CSV (``<run>/logs/version_N/metrics.csv``, read back by the plots); Weights & Biases logging is on
by default and offline unless you are logged in (``wandb login`` or ``WANDB_API_KEY``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .buffer import DiscBuffer
from .clt import CrossLayerTranscoder
from .config import CLTConfig, TrainConfig, TrainerConfig
from .data import ActivationData, LiveActivations
from .end_to_end import finetune
from .precision import keep_freed_memory, lightning_accelerator, training_precision
from .sites import ActivationBatch
from .validation import ReplacementValidation

log = logging.getLogger("cltlab")


class CLTModule(L.LightningModule):
    """Trains a ``CrossLayerTranscoder``; built from plain dicts so ``load_from_checkpoint`` can rebuild it."""

    def __init__(self, clt_config: dict, train_config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.clt = CrossLayerTranscoder(CLTConfig.from_dict(clt_config))
        self.cfg = TrainConfig.from_dict(train_config)  # nested, or flat from a checkpoint before the nesting
        # Tokens since each feature last fired, for the dead-feature fraction.
        self.register_buffer("tokens_since_active", torch.zeros(self.clt.n_layers, self.clt.d_features))
        self.register_buffer("tokens_seen", torch.zeros(()))
        # torch.compile fuses the loss's elementwise passes; the decoder's autograd Function stays eager.
        self.loss_fn = torch.compile(self.clt.loss) if self.cfg.trainer.compile else self.clt.loss

    def sparsity_coef(self) -> float:
        """λ, ramped linearly from 0 over the warm-up fraction of training."""
        loss = self.cfg.loss
        warmup = loss.sparsity_warmup * self.cfg.trainer.max_steps
        return loss.sparsity_coef * min(1.0, self.global_step / warmup) if warmup > 0 else loss.sparsity_coef

    def training_step(self, batch: ActivationBatch, batch_idx: int) -> torch.Tensor:
        x, y = batch.resid_mid.float(), batch.mlp_out.float()  # (batch, n_layers, d_model)
        lam = self.sparsity_coef()
        loss = self.cfg.loss
        out = self.loss_fn(
            x,
            y,
            sparsity_coef=lam,
            sparsity_c=loss.sparsity_c,
            preact_coef=loss.preact_coef,
            decoding=loss.decoding,
            layer_weights=self.clt.layer_weights(loss.layer_weighting),
        )
        losses = self.from_every_rank(out.total.detach().float())  # (world_size,)
        if not losses.isfinite().all():
            ranks = (~losses.isfinite()).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"Loss became {losses[ranks[0]].item()} at step {self.global_step}{self.on_ranks(ranks)}; "
                "lower the learning rate (the last checkpoint is kept)."
            )
        self.tokens_seen += x.shape[0]
        self.tokens_since_active += x.shape[0]
        self.tokens_since_active[out.active] = 0
        if self.global_step % self.cfg.trainer.log_every == 0:
            self.log_metrics(out, lam)
        return out.total

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before the step when a gradient is non-finite though the loss was finite, so that no checkpoint
        ever holds the weights it would make. Under fp16 mixed precision Lightning's GradScaler skips such steps
        itself (and lowers its scale), so the check is left to it."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        names, grads = zip(*((name, p.grad) for name, p in self.clt.named_parameters()), strict=True)
        # A parameter without a gradient (frozen, or without a shard on this rank) counts as finite.
        finite = torch.ones(len(grads), device=self.device)  # (n_params,)
        for i, grad in enumerate(grads):
            # max |g| is finite iff every entry is (NaN propagates): one pass over the gradient, no bool copy
            if grad is not None:
                finite[i] = torch.linalg.vector_norm(grad, ord=float("inf")).isfinite()
        finite = self.from_every_rank(finite).bool()  # (world_size, n_params)
        if finite.all():
            return
        bad = ", ".join(name for name, ok in zip(names, finite.all(dim=0).tolist(), strict=True) if not ok)
        ranks = (~finite.all(dim=1)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"The gradient of {bad} became non-finite at step {self.global_step}{self.on_ranks(ranks)} while the "
            "loss was finite; lower the learning rate (no step was taken; the last checkpoint is kept)."
        )

    def from_every_rank(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` from every rank, stacked: (world_size, *value.shape). A collective, so that every rank takes
        the same decision from it (a rank that raised alone would leave the others waiting in the next
        all-reduce)."""
        return self.all_gather(value).reshape(self.trainer.world_size, *value.shape)

    def on_ranks(self, ranks: list[int]) -> str:
        """Where something happened, for an error message: nothing on a single process."""
        if self.trainer.world_size == 1:
            return ""
        return f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {self.trainer.world_size}"

    def dead_fraction(self) -> float:
        """Fraction of features that have not fired within the last ``dead_window`` tokens (or ever, early on)."""
        window = min(float(self.cfg.trainer.dead_window), float(self.tokens_seen))
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
        config = self.cfg.optimizer
        optimizer = torch.optim.Adam(self.clt.parameters(), lr=config.lr, fused=True)  # fused on CPU and GPU
        schedule = functools.partial(
            lr_factor,
            max_steps=self.cfg.trainer.max_steps,
            warmup_steps=config.lr_warmup_steps,
            decay=config.lr_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: float, *, max_steps: int, warmup_steps: int, decay: float) -> float:
    """Learning-rate multiplier: linear warm-up from 0 over ``warmup_steps``, constant, then linear decay to 0 over
    the last ``decay`` fraction of ``max_steps``."""
    decay_steps = int(decay * max_steps)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cool = min(1.0, max(0.0, (max_steps - step) / decay_steps)) if decay_steps > 0 else 1.0
    return warm * cool


def wandb_logged_in() -> bool:
    """True when a W&B API key is configured (then runs sync online)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def strategy_for(name: str):
    """The Lightning strategy called ``name``. FSDP gets ``use_orig_params`` so that ``CLTModule``'s optimizer,
    built from ``self.clt.parameters()``, sees the CLT's own parameters (each rank holding a shard of each)."""
    if name in ("fsdp", "fsdp_cpu_offload"):
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(use_orig_params=True, cpu_offload=name == "fsdp_cpu_offload")
    return name


def text_progress_bar(config: TrainerConfig) -> list:
    """In a kernel of ``cltlab run`` (``CLTLAB_PROGRESS=text``), a text progress bar that the runner passes on to
    its terminal (Lightning's default there is a Rich bar inside a widget); elsewhere Lightning's default."""
    if os.environ.get("CLTLAB_PROGRESS") != "text":
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar(refresh_rate=max(1, config.log_every))]


def quiet_lightning_tips() -> None:
    """Drop Lightning's advertisement for its cloud logger from the logs (no setting turns it off)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in logger.filters):
        logger.addFilter(_NoTips())


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def make_trainer(
    config: TrainerConfig, run_dir: str | Path, *, checkpoints: bool = True, **overrides
) -> L.Trainer:
    """A Lightning Trainer for ``config``: device chosen automatically, CSV (+ W&B) logs and checkpoints under ``run_dir``.

    ``devices``, ``num_nodes`` and ``strategy`` come from the config (Lightning recognises processes started by
    torchrun or SLURM from their environment); rank 0 writes the checkpoints and logs. ``callbacks`` in
    ``overrides`` join the checkpoint callback (none with ``checkpoints=False``); any other override replaces that
    Trainer argument.
    """
    run_dir = Path(run_dir)
    loggers = [CSVLogger(run_dir, name="logs")]  # one version_N folder per call; see plots.read_metrics
    if config.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project="cltlab", save_dir=str(run_dir), offline=not wandb_logged_in(), name=run_dir.name
            )
        )
    saving = (
        [
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                every_n_train_steps=config.checkpoint_every,
                save_last=True,
                save_top_k=-1,
            )
        ]
        if checkpoints
        else []
    )
    kwargs = dict(
        max_steps=config.max_steps,
        max_epochs=-1,
        accelerator=lightning_accelerator(config.accelerator),
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy_for(config.strategy),
        use_distributed_sampler=False,  # ActivationData already gives each rank its own part of the buffer
        precision=training_precision(config.precision, accelerator=config.accelerator),
        logger=loggers,
        callbacks=[*saving, *text_progress_bar(config), *overrides.pop("callbacks", [])],
        enable_checkpointing=checkpoints,
        log_every_n_steps=config.log_every,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    kwargs.update(overrides)
    quiet_lightning_tips()
    return L.Trainer(**kwargs)


class TrainResult(NamedTuple):
    """What ``train`` produced."""

    clt: CrossLayerTranscoder | None
    """The trained transcoder (on the CPU, eval mode); ``None`` on ranks other than 0 of an FSDP run."""
    clt_dir: Path
    """Where it was saved (safetensors + config.json)."""
    log_dir: Path
    """The CSV logs (``version_N/metrics.csv``, one per call; ``plots.read_metrics`` joins them)."""
    checkpoint_dir: Path
    """Lightning checkpoints (for resuming)."""
    rank: int = 0
    """This process's global rank; rank 0 alone writes the CLT, the checkpoints and the logs."""


def train(
    config: TrainConfig,
    data: str | Path | torch.utils.data.IterableDataset,
    run_dir: str | Path,
    *,
    resume: bool = False,
    **trainer_overrides,
) -> TrainResult:
    """Train a CLT (or a per-layer transcoder) on a harvested buffer; save it to ``<run_dir>/clt``.

    ``data`` is a harvest folder, or an IterableDataset with ``n_layers``, ``d_model``, ``layer_start`` and ``stats``,
    e.g. ``cltlab.ActivationClient(url).dataset(batch_size)`` reading from an activation server. With
    ``config.data.live`` the rows are harvested as training needs them, as the folder ``data`` was harvested
    (``data.LiveActivations``).

    With several devices or nodes (``config.trainer``: ``devices``, ``num_nodes``, ``strategy``) every process runs this
    function: each rank trains on its own disjoint part of the buffer (see ``data.ActivationData``), and rank 0
    saves the CLT.
    """
    run_dir = Path(run_dir)
    keep_freed_memory()  # every step's batch in reused memory
    L.seed_everything(config.trainer.seed, verbose=False)
    if config.data.live and not isinstance(data, torch.utils.data.IterableDataset):
        check_live(config)
        data = LiveActivations.like(data, config.data, seed=config.trainer.seed)
    try:
        return _train(config, data, run_dir, resume=resume, **trainer_overrides)
    finally:
        if isinstance(data, LiveActivations):
            data.close()


def one_device(config: TrainerConfig) -> bool:
    """Whether ``config`` trains on one device of one machine (one process)."""
    return str(config.devices) == "1" and config.num_nodes == 1


def fit(trainer: L.Trainer, module: L.LightningModule, **kwargs) -> None:
    """``trainer.fit``, without the warning torch gives for a pytree API that Lightning's own code calls (it says
    nothing about ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        trainer.fit(module, **kwargs)


def check_live(config: TrainConfig) -> None:
    """Refuse live training where it cannot work: several processes (each would harvest the same rows) or
    DataLoader workers (the harvester thread lives in the training process)."""
    if not one_device(config.trainer) or config.data.num_workers:
        raise ValueError(
            "data.live trains on one device in one process: set trainer.devices=1, trainer.num_nodes=1 and "
            "data.num_workers=0, or serve live rows to every rank with `cltlab serve --live`."
        )


def _train(
    config: TrainConfig,
    data: str | Path | torch.utils.data.IterableDataset,
    run_dir: Path,
    *,
    resume: bool,
    **trainer_overrides,
) -> TrainResult:
    datamodule = ActivationData(data, config.data, seed=config.trainer.seed)
    buffer = datamodule.source  # the whole buffer (or stream): the same shape and statistics on every rank
    check_finetune(config, buffer)
    clt_config = CLTConfig(
        **dataclasses.asdict(config.transcoder),
        n_layers=buffer.n_layers,
        d_model=buffer.d_model,
        layer_offset=buffer.layer_start,
    )
    module = CLTModule(dataclasses.asdict(clt_config), dataclasses.asdict(config))
    module.clt.set_normalization(*buffer.stats)
    validation = validation_for(buffer, config.trainer) if config.trainer.val_every else None
    if validation is not None:
        trainer_overrides["callbacks"] = [*trainer_overrides.get("callbacks", []), validation]
    if isinstance(buffer, DiscBuffer):
        buffer.close()  # each rank opens its own part in ActivationData.setup
    trainer = make_trainer(config.trainer, run_dir, **trainer_overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        # weights_only: a checkpoint holds tensors and plain values; unpickling anything else could run code.
        ckpt_path = str(last) if resume and last.exists() else None
        fit(trainer, module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        finish_wandb(trainer)
    clt = trained_clt(trainer, module)
    clt_dir = run_dir / "clt"
    if trainer.is_global_zero and config.finetune.kl_steps:
        origin = buffer.origin  # check_finetune made sure there is one
        clt = finetune(
            clt,
            model=origin["model"],
            corpus=origin["corpus"],
            seq_len=origin["seq_len"],
            config=config.finetune,
            run_dir=run_dir,
            trainer_config=config.trainer,
            step_offset=trainer.global_step,
            held_out=validation.held_out if validation is not None else None,
        )
    if trainer.is_global_zero:
        clt.save(clt_dir)
        log.info("Saved the CLT to %s", clt_dir)
    return TrainResult(clt, clt_dir, run_dir / "logs", run_dir / "checkpoints", trainer.global_rank)


def finish_wandb(trainer: L.Trainer) -> None:
    """Close the trainer's W&B run, so that the next stage or ``train()`` in this kernel starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()


def check_finetune(config: TrainConfig, source) -> None:
    """Refuse an end-to-end fine-tune that cannot run, before the MSE stage spends its time: it runs on one
    device, and needs to know the model and corpus the activations came from."""
    if not config.finetune.kl_steps:
        return
    if not one_device(config.trainer):
        raise ValueError(
            "finetune.kl_steps runs on one device: set it to 0 for a multi-device run (and fine-tune the saved "
            "CLT with cltlab.finetune on one device), or train on trainer.devices=1."
        )
    if getattr(source, "origin", None) is None:
        raise ValueError(
            "finetune.kl_steps needs the model and corpus the activations came from (a harvest folder's manifest "
            "or an activation server's info names them; this source does not): set it to 0, or call "
            "cltlab.finetune on the trained CLT."
        )


def validation_for(buffer, config: TrainerConfig) -> ReplacementValidation:
    """The held-out validation ``config.val_every`` asks for, on the model and corpus the harvest's manifest
    names."""
    if config.strategy.startswith("fsdp"):
        raise ValueError(
            "val_every does not work with FSDP (each rank holds a shard of the CLT); set it to 0."
        )
    origin = getattr(buffer, "origin", None)
    if origin is None:
        raise ValueError(
            "val_every needs to know the model and corpus the activations came from (a harvest folder's manifest "
            "or an activation server's info names them; this source does not): set val_every to 0, or pass "
            "callbacks=[cltlab.validation.ReplacementValidation(model, corpus=..., seq_len=..., every=...)]."
        )
    return ReplacementValidation(
        origin["model"],
        corpus=origin["corpus"],
        seq_len=origin["seq_len"],
        every=config.val_every,
        n_sequences=config.val_sequences,
    )


def trained_clt(trainer: L.Trainer, module: CLTModule) -> CrossLayerTranscoder | None:
    """The trained CLT whole, on the CPU. Under FSDP every rank holds a shard of each weight: all ranks take part
    in gathering them, and rank 0 alone receives the result (the others get ``None``)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.clt.float().cpu().eval()
    state = trainer.strategy.lightning_module_state_dict()  # a collective: full on rank 0, empty elsewhere
    if not trainer.is_global_zero:
        return None
    clt = CrossLayerTranscoder(module.clt.config)
    clt.load_state_dict({k.removeprefix("clt."): v for k, v in state.items() if k.startswith("clt.")})
    return clt.float().eval()
