"""Quality per CPU-minute of the ``default`` profile: train variants of it on one harvest and compare them.

Each point changes a few fields (``TrainConfig.replace`` names) of ``BASE``: the default profile's ``TrainConfig`` as
it was when the sweep began (256 features, λ 3e-4, lr 6e-4, every layer's error weighted alike; 600 steps, ~50
minutes of ``make run``). All train on the same harvest (``--buffer``, a default run's) and are evaluated as notebook
04 does (``cltlab.evaluate``: the profile's eval config, held-out text, float32 model). A point's wall time is its
training time (an end-to-end stage included); the points come in two budgets, ~6 and ~4–5 minutes, and the
default point's end-to-end stage adds ~5–6 (``F64_S200_residual_e2e700x2_pool320_enc8`` is today's default
profile). Finished points are kept under ``--out`` (keyed by their config, harvest and eval), so running again
reuses them.

With ``--seeds`` every point also runs from other seeds (``trainer.seed``: initialization and batch order) and the
table averages over them: between seeds of one point the KL moved by up to 1.9 nats (the default point: 3.49, 4.52,
5.40 at NMSE 0.57–0.59), so rank by the mean of three or more. The table printed at the end has one row per point;
the last lines are ``name = value`` for the best point (lowest mean KL among those within ``--budget`` seconds of
training).
Usage: python benchmarks/sweep.py [--buffer runs/default/activations] [--points baseline,lam1e-4] [--seeds 0,1,2]
       [--list]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import cltlab

# The old default, without an end-to-end stage (kl_steps=0).
BASE = dict(d_features=256, sparsity_coef=3e-4, lr=6e-4, layer_weighting="uniform", kl_steps=0)
# name → TrainConfig.replace(**BASE, **changes) from the default profile, each at about the same wall time: ``STEPS``
# steps of 512 tokens (~3 s each on this 2-core AVX2 CPU: ~5 minutes), or as many steps of another shape as take
# as long (half the batch or half the features: twice the steps, a quarter of the features: three times; a
# per-layer transcoder's step takes ~1.2 s here).
STEPS = 100
# The MSE stage of the point the ``default`` profile is now; the ~4–5-minute points vary it.
RESIDUAL = dict(d_features=64, max_steps=200, lr=2e-3, sparsity_coef=1e-4, layer_weighting="residual")
# The end-to-end stage after it (``FinetuneConfig``: ~5–6 minutes here, capped at 6); together the ``default``
# profile now (tests/test_config.py checks it).
E2E = dict(
    kl_steps=700,
    kl_sequences=2,
    kl_lr=1e-4,
    kl_encoder_lr_scale=8.0,
    kl_mse_coef=1e-3,
    kl_max_minutes=6.0,
    kl_text_sequences=320,
)
NOW = {**RESIDUAL, **E2E}
# the earlier end-to-end defaults: the encoder at the stage's rate; fresh text at every step; the batch and learning
# rate of the first two
ENC1 = {**NOW, "kl_encoder_lr_scale": 1.0}
FRESH = dict(kl_text_sequences=None)
E2E_BATCH4 = dict(**FRESH, kl_sequences=4, kl_lr=3e-4)
POINTS: dict[str, dict] = {
    "default": {},
    "lr2e-3_lam1e-4": dict(lr=2e-3, sparsity_coef=1e-4),
    "lr2e-3_lam3e-5": dict(lr=2e-3, sparsity_coef=3e-5),
    "lr4e-3_lam1e-4": dict(lr=4e-3, sparsity_coef=1e-4),
    "B256_lr2e-3_lam1e-4": dict(batch_size=256, max_steps=2 * STEPS, lr=2e-3, sparsity_coef=1e-4),
    "F128_lr2e-3_lam1e-4": dict(d_features=128, max_steps=2 * STEPS, lr=2e-3, sparsity_coef=1e-4),
    "F64_lr2e-3_lam1e-4": dict(d_features=64, max_steps=3 * STEPS, lr=2e-3, sparsity_coef=1e-4),
    "lr2e-3_lam1e-4_c1": dict(lr=2e-3, sparsity_coef=1e-4, sparsity_c=1.0),
    "lr2e-3_lam1e-4_theta0.03": dict(lr=2e-3, sparsity_coef=1e-4, threshold_init=0.03),
    "batchtopk32_lr2e-3": dict(activation_kind="batchtopk", k=32, lr=2e-3),
    "plt_S250_lr2e-3_lam1e-4": dict(cross_layer=False, max_steps=5 * STEPS // 2, lr=2e-3, sparsity_coef=1e-4),
    # ~4 minutes of training (what a ~10-minute ``make run`` leaves): ~2 s per step at 128 features, ~1.2 s at 64
    "F128_S120": dict(d_features=128, max_steps=120, lr=2e-3, sparsity_coef=1e-4),
    "F64_S200": dict(d_features=64, max_steps=200, lr=2e-3, sparsity_coef=1e-4),
    "F32_S300": dict(d_features=32, max_steps=300, lr=2e-3, sparsity_coef=1e-4),
    "F64_S200_lr4e-3": dict(d_features=64, max_steps=200, lr=4e-3, sparsity_coef=1e-4),
    "F64_B256_S400_lr1e-3": dict(d_features=64, batch_size=256, max_steps=400, lr=1e-3, sparsity_coef=1e-4),
    "F64_S200_residual": RESIDUAL,
    "F128_S200_residual": {**RESIDUAL, "d_features": 128},
    "F64_S150_residual": {**RESIDUAL, "max_steps": 150},
    "F64_S200_residual_c1": {**RESIDUAL, "sparsity_c": 1.0},
    "F64_S200_residual_theta0.03": {**RESIDUAL, "threshold_init": 0.03},
    "F64_S200_residual_warmup0.3": {**RESIDUAL, "sparsity_warmup": 0.3},
    "F64_S200_residual_batchtopk16": {
        **RESIDUAL,
        "activation_kind": "batchtopk",
        "k": 16,
        "sparsity_coef": 3e-4,
    },
    "F64_S200_residual_lam3e-5": {**RESIDUAL, "sparsity_coef": 3e-5},
    "F64_S200_residual_decay0.5": {**RESIDUAL, "lr_decay": 0.5},
    "F64_S200_residual_decay1": {**RESIDUAL, "lr_decay": 1.0},
    "F64_S200_residual_lr3e-3_decay1": {**RESIDUAL, "lr": 3e-3, "lr_decay": 1.0},
    "F64_S300_residual": {**RESIDUAL, "max_steps": 300},
    # earlier defaults' end-to-end stages (60 and 120 steps of 4 sequences at lr 3e-4, 360 and 480 of 2, on fresh
    # text at every step), with today's code
    "F64_S200_residual_e2e60": {**ENC1, **E2E_BATCH4, "kl_steps": 60, "kl_max_minutes": 4.0},
    "F64_S200_residual_e2e120": {**ENC1, **E2E_BATCH4, "kl_steps": 120, "kl_max_minutes": 5.0},
    "F64_S200_residual_e2e360x2": {**ENC1, **FRESH, "kl_steps": 360},
    "F64_S200_residual_e2e480x2": {**ENC1, **FRESH, "kl_steps": 480},
    "F64_S200_residual_e2e600x2_pool320": {**ENC1, "kl_steps": 600},
    "F64_S200_residual_e2e700x2_pool320": ENC1,
    "F64_S200_residual_e2e700x2_pool320_enc4": {**NOW, "kl_encoder_lr_scale": 4.0},
    "F64_S200_residual_e2e700x2_pool320_enc8": NOW,
}
FIGURES = ("kl", "top1_agreement", "ce_recovered", "nmse", "mean_l0")


def run_point(name: str, seed: int, buffer: Path, summary: str, out: Path, model, profile) -> dict:
    """Train and evaluate one point from one seed (``trainer.seed``: initialization and batch order), or read it
    back when it has been run with the same config (seed 0 in ``<out>/<name>``, seed n in ``<out>/<name>_seed<n>``);
    ``summary``: the harvest's ``DiscBuffer.summary()``, part of that key."""
    changes = {**BASE, **POINTS[name], "seed": seed}
    steps = changes.get("max_steps", STEPS)
    config = profile.train.replace(
        **{"max_steps": steps, "wandb": False, "checkpoint_every": steps, "val_every": 0, **changes}
    )
    run_dir = out / (name if seed == 0 else f"{name}_seed{seed}")
    key = dict(
        train=dataclasses.asdict(config),
        buffer=summary,
        eval=dataclasses.asdict(profile.eval),
    )
    saved = run_dir / "sweep.json"
    if saved.exists() and json.loads(saved.read_text())["key"] == key:
        return json.loads(saved.read_text())["result"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished or differently configured run
    start = time.perf_counter()
    result = cltlab.train(config, buffer, run_dir, enable_progress_bar=False)
    train_s = time.perf_counter() - start
    shutil.rmtree(result.checkpoint_dir, ignore_errors=True)
    metrics = cltlab.evaluate(
        model,
        result.clt,
        corpus=profile.harvest.corpus,
        seq_len=profile.harvest.seq_len,
        config=profile.eval,
        progress=False,
    )
    figures = metrics.to_dict()
    figures["nmse"] = sum(metrics.nmse) / len(metrics.nmse)
    outcome = {"train_s": train_s, **{k: figures[k] for k in FIGURES}}
    saved.write_text(json.dumps(dict(key=key, result=outcome), indent=2))
    return outcome


def mean_over_seeds(runs: list[dict]) -> dict:
    """One point's figures averaged over its seeds' runs, with the KL's lowest and highest."""
    mean = {key: sum(r[key] for r in runs) / len(runs) for key in ("train_s", *FIGURES)}
    return mean | dict(seeds=len(runs), kl_low=min(r["kl"] for r in runs), kl_high=max(r["kl"] for r in runs))


def table(results: dict[str, dict]) -> str:
    head = f"| {'point':<22} | seeds | train s | KL (range) | top-1 | CE rec. | NMSE | L0 |"
    lines = [head, "|" + "---|" * 8]
    for name, r in results.items():
        lines.append(
            f"| {name:<22} | {r['seeds']} | {r['train_s']:.0f} | {r['kl']:.3f} ({r['kl_low']:.2f}–{r['kl_high']:.2f}) | "
            f"{r['top1_agreement']:.3f} | {r['ce_recovered']:.3f} | {r['nmse']:.3f} | {r['mean_l0']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--buffer", default="runs/default/activations", help="The harvest to train on.")
    parser.add_argument("--out", default="runs/sweep", help="Cache folder for the points' runs.")
    parser.add_argument("--points", default=",".join(POINTS), help="Comma-separated point names.")
    parser.add_argument("--budget", type=float, default=400.0, help="Training seconds a winner may take.")
    parser.add_argument(
        "--seeds",
        default="0",
        help="Comma-separated seeds; the table averages each point over them (KL moves by "
        "~1 nat between seeds of one point: rank by the mean of three or more).",
    )
    parser.add_argument("--list", action="store_true", help="Print the points and what each changes.")
    args = parser.parse_args()
    if args.list:
        for name, changes in POINTS.items():
            print(f"{name:<22} {changes}")
        return
    names = args.points.split(",")
    unknown = [n for n in names if n not in POINTS]
    if unknown:
        parser.error(f"unknown point(s) {', '.join(unknown)}; --list shows them")
    profile = cltlab.config.get_profile("default")
    model = cltlab.load_model(profile.harvest.model)  # float32 for evaluation, as notebook 04 does
    seeds = [int(seed) for seed in args.seeds.split(",")]
    summary = cltlab.DiscBuffer(args.buffer).summary()  # read once, for every point's cache key
    results = {}
    for name in names:
        runs = []
        for seed in seeds:
            r = run_point(name, seed, Path(args.buffer), summary, Path(args.out), model, profile)
            runs.append(r)
            print(f"{name:<22} seed {seed} {r['train_s']:.0f} s  KL {r['kl']:.3f}  top-1 {r['top1_agreement']:.3f}  "
                  f"CE rec. {r['ce_recovered']:.3f}  NMSE {r['nmse']:.3f}  L0 {r['mean_l0']:.1f}", flush=True)  # fmt: skip
        results[name] = mean_over_seeds(runs)
    print(table(results))
    within = {n: r for n, r in results.items() if r["train_s"] <= args.budget}
    if within:
        best = min(within, key=lambda n: within[n]["kl"])
        print(f"best = {best}")
        for figure in FIGURES:
            print(f"best_{figure} = {within[best][figure]:.4g}")


if __name__ == "__main__":
    main()
