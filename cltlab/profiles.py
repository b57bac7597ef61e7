"""The named profiles: data, each a ``Profile`` bundling a harvest, a training and an evaluation config.

``ci`` is CI's tiny run (seeded random tiny-gpt2), ``default`` the embedded SmolLM2-135M on a CPU, ``gpu`` the same
model at scale on one GPU, ``gpt2`` GPT-2 small from the hub. ``get_profile`` returns a copy, or a profile saved as
YAML.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    HarvestConfig,
    LossConfig,
    OptimizerConfig,
    Profile,
    TrainConfig,
    TrainerConfig,
    TranscoderConfig,
)

PROFILES: dict[str, Profile] = {
    # CI: seeded random tiny GPT-2 (real GPT-2 tokenizer), a few thousand tokens, seconds per stage.
    "ci": Profile(
        name="ci",
        harvest=HarvestConfig(model="tiny-gpt2", n_tokens=4096, seq_len=64, batch_size=16),
        train=TrainConfig(
            transcoder=TranscoderConfig(d_features=128),
            loss=LossConfig(sparsity_coef=1e-3),
            optimizer=OptimizerConfig(lr=1e-3),
            trainer=TrainerConfig(
                max_steps=60, log_every=5, checkpoint_every=30, wandb=False, val_every=30, val_sequences=4
            ),
            data=DataConfig(batch_size=256),
            finetune=FinetuneConfig(kl_steps=4, kl_sequences=4, kl_warmup_steps=2),
        ),
        eval=EvalConfig(n_sequences=8, batch_size=4),
    ),
    # The embedded real model on a CPU, ~10 minutes on a 2-core machine: the best setting of benchmarks/sweep.py
    # at that budget (64 features × 200 steps, each layer's error weighted by how much of the residual stream its
    # MLP writes, then up to 700 end-to-end steps of 2 sequences on the replacement's KL, over a pool of 320 sequences);
    # see the README's "Quality per CPU-minute".
    "default": Profile(
        name="default",
        harvest=HarvestConfig(
            model="smollm2-135m",
            n_tokens=60_000,
            seq_len=128,
            batch_size=16,
            model_dtype="bfloat16",
            dtype="bfloat16",
        ),
        train=TrainConfig(
            transcoder=TranscoderConfig(d_features=64),
            loss=LossConfig(sparsity_coef=1e-4, layer_weighting="residual"),
            optimizer=OptimizerConfig(lr=2e-3),
            trainer=TrainerConfig(
                max_steps=200,
                precision="bf16-mixed",
                log_every=10,
                checkpoint_every=100,
                val_every=300,  # at the MSE stage's end, end-to-end step 300 and the stage's end (~7 s, then ~2.5 s)
                val_sequences=8,
            ),
            # batches read in the training process: on 2 cores a worker process only competes with the step
            data=DataConfig(batch_size=512),
            # then ~6 minutes end to end: the replacement model's KL through the frozen model (end_to_end.py), up to
            # 700 steps over the first 320 training sequences, each one's original run kept after the first epoch
            finetune=FinetuneConfig(
                kl_steps=700,
                kl_sequences=2,
                kl_lr=1e-4,
                kl_encoder_lr_scale=8.0,  # the encoder at 8e-4: KL 1.406 against 1.431 at 4x, 1.482 at 1x (seed 0)
                kl_mse_coef=1e-3,
                kl_max_minutes=6.0,
                kl_text_sequences=320,
            ),
        ),
        eval=EvalConfig(n_sequences=32, batch_size=2),
    ),
    # One modern GPU (tens of GiB): every layer of smollm2-135m, 4096 features per layer, 20M training tokens
    # harvested live (~1.4 TB in bf16: more than a disc holds) from the offline corpus, which repeats (use an
    # ``hf:`` corpus online); the folder keeps 262,144 tokens (18 GiB) for feature statistics and dashboards.
    "gpu": Profile(
        name="gpu",
        harvest=HarvestConfig(
            model="smollm2-135m",
            n_tokens=262_144,
            seq_len=128,
            batch_size=64,
            model_dtype="bfloat16",
            dtype="bfloat16",
        ),
        train=TrainConfig(
            transcoder=TranscoderConfig(d_features=4096),
            loss=LossConfig(sparsity_coef=2e-4),
            optimizer=OptimizerConfig(lr=4e-4, lr_warmup_steps=100),
            trainer=TrainerConfig(
                max_steps=4883,  # × 4096 tokens = 20M
                precision="bf16-mixed",
                compile=True,
                log_every=50,
                checkpoint_every=1000,
                val_every=500,
                val_sequences=32,
            ),
            data=DataConfig(batch_size=4096, live=True, shuffle_rows=262_144),
        ),
        eval=EvalConfig(n_sequences=256, batch_size=32),
    ),
    # GPT-2 small from the hub (needs the network once).
    "gpt2": Profile(
        name="gpt2",
        harvest=HarvestConfig(model="gpt2", n_tokens=200_000, seq_len=128, batch_size=16),
        train=TrainConfig(
            transcoder=TranscoderConfig(d_features=2048),
            loss=LossConfig(sparsity_coef=2e-4),
            optimizer=OptimizerConfig(lr=2e-4),
            trainer=TrainerConfig(max_steps=3000, val_every=500),
            data=DataConfig(batch_size=1024),
        ),
        eval=EvalConfig(n_sequences=64, batch_size=8),
    ),
}


def get_profile(name: str | Path) -> Profile:
    """A copy of the profile called ``name`` (so a notebook may edit it freely), or the one saved in the YAML file
    ``name`` (``Profile.save``)."""
    if str(name) in PROFILES:
        return copy.deepcopy(PROFILES[str(name)])
    if Path(name).suffix in (".yaml", ".yml"):
        return Profile.load(name)
    raise KeyError(f"Unknown profile {str(name)!r}; choose one of {sorted(PROFILES)} or give a YAML file.")
