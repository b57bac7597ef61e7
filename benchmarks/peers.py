"""Training-step speed against peer libraries on identical shapes and weights, side by side in one run (CPU).

- ``ours/sparsify``: ms/step of eai-sparsify 1.3.3 ÷ ours, on a one-layer TopK transcoder (resid_mid →
  mlp_out; d_model 576, 4608 latents, k 32, batch 4096): its ``SparseCoder`` with ``transcode=True`` (fused
  TopK encoder, embedding_bag decoder) against our ``CLTConfig(n_layers=1, activation_kind="topk",
  cross_layer=False)``. Our step is timed with ``decoding="dense"`` and ``"auto"``, the ratio takes the best.
- ``ours/llamascopium_dense``: ms/step of llamascopium 2.0.0b34's JumpReLU ``CrossLayerTranscoder`` ÷ ours,
  thresholds at their initial value (about 40% of the features fire), both decoding densely; the smaller ratio
  of two shapes: 30 layers × d_model 576 × 256 features, batch 512, and 12 × 768 × 3072, batch 1024.
- ``ours/llamascopium_sparse``: the same two shapes with every layer's threshold at the 98% quantile of its
  pre-activations on the batch (L0/F ≈ 2%, as in a trained CLT; ``train_speed.set_density``); ours with
  ``decoding="auto"``, llamascopium dense (its CSR decoding is meant for TopK, refuses bf16, and gave a
  threshold gradient that differs from its dense path).

How: per shape, our model is built from a seed (biases made non-zero, input and output normalization set to
identity), its weights are copied into the peer's layout (encoder, encoder bias, decoder, decoder bias,
thresholds), and both take the same random batch. Before any timing the reconstructions, the FVU (squared
error ÷ target variance) and the losses must agree (relative 1e-4, in float32 whatever ``--dtype``), else the
script exits naming the shape and both values. A step is forward + loss + backward + Adam (fused, lr 1e-4, an
optimizer per side); the sides' steps alternate, after warm-ups, and the median is kept. Each shape runs in a
process of its own (``run_alone``), so that none starts from the memory another left.

Loss terms (λ = 2e-4, c = 4, pre-activation coefficient 3e-6, as in our default profile):
- sparsify: FVU = Σ(y − ŷ)² ÷ Σ(y − ȳ)² (its trainer's loss with auxk_alpha 0 and no multi-TopK; the trainer's
  loop is not used). Ours: ``clt.loss(sparsity_coef=0, preact_coef=0)``: the MSE (the FVU times a constant),
  and the tanh sparsity term times zero, whose graph ours still builds (TopK has no pre-activation term).
- llamascopium: ``compute_loss(sparsity_loss_type="tanh")``: Σ_d (y − ŷ)² averaged over layers and tokens
  (d_model × our MSE) + λ' · Σ_F tanh(c · ‖W_dec,i‖ · f_i) averaged over layers and tokens, with its decoder
  norms computed without gradient; λ' = λ · n_layers · d_model makes its loss d_model × (our MSE + λ · our
  sparsity). Ours in addition: the sparsity term's gradient into the decoder norms, and the pre-activation
  loss Σ relu(θ − h) · ‖W_dec,i‖. So the check compares MSE, FVU, and our total less the pre-activation term.

Float32 by default (this project's CPUs have no fast bf16); ``--dtype bfloat16`` runs both in bf16 autocast.
The peers live in a side environment, ``.venv-peers`` in the repository root (built on first use with
``-c constraints.txt``: the two peers, transformer-lens < 4 for llamascopium, cltlab editable); run from our
venv, the script re-runs itself there. ``--profile`` prints each side's top operators for one step.

Usage: python benchmarks/peers.py [--shapes topk clt30 clt12] [--steps N --warmup N | --quick]
       [--dtype bfloat16] [--profile]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from interleaved import interleaved, profile, training_step
from peer_env import in_peer_venv, peer_python
from train_speed import set_density

from cltlab.clt import CrossLayerTranscoder
from cltlab.config import CLTConfig

SPARSITY_COEF, SPARSITY_C, PREACT_COEF = 2e-4, 4.0, 3e-6
DENSITY = 0.02
TOLERANCE = 1e-4
"""Relative agreement required of the two sides' reconstructions and losses, checked in float32 before timing
whatever the timed dtype (under bf16 a TopK selection can flip on a near-tie, which proves nothing)."""


class Shape(NamedTuple):
    """One comparison: which peer, the transcoder's size, the batch, and how many steps to time by default."""

    name: str
    peer: str
    n_layers: int
    d_model: int
    d_features: int
    batch: int
    steps: int
    warmup: int


SHAPES = {
    shape.name: shape
    for shape in [
        Shape("topk", "sparsify", 1, 576, 4608, 4096, steps=7, warmup=2),
        Shape("clt30", "llamascopium", 30, 576, 256, 512, steps=7, warmup=1),
        Shape("clt12", "llamascopium", 12, 768, 3072, 1024, steps=5, warmup=1),
    ]
}
TOPK_K = 32

# ----------------------------------------------------------------------------------------------- agreement


def check(shape: Shape, what: str, ours: float, theirs: float, tolerance: float) -> None:
    """Exit with a clear message unless ours and the peer's values agree within ``tolerance`` (relative)."""
    if not math.isclose(ours, theirs, rel_tol=tolerance, abs_tol=1e-12):
        sys.exit(
            f"{shape.name} ({shape.peer}, L{shape.n_layers} d{shape.d_model} F{shape.d_features}): {what} "
            f"disagrees: ours {ours:.8g}, {shape.peer} {theirs:.8g} (relative tolerance {tolerance:g}). The "
            "weights or loss terms were not carried over identically; timings mean nothing until they are."
        )


def check_reconstruction(shape: Shape, ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> None:
    """Exit unless ‖ours − theirs‖ ≤ ``tolerance`` · ‖ours‖ (the reconstructions, same shape)."""
    difference = ((ours.float() - theirs.float()).norm() / ours.float().norm()).item()
    if not difference <= tolerance:
        sys.exit(
            f"{shape.name} ({shape.peer}): the reconstructions differ by {difference:.3g} relative (norm of "
            f"the difference ÷ norm of ours; tolerance {tolerance:g}): the weights were not carried over "
            "identically."
        )


def build_ours(shape: Shape, config: CLTConfig) -> CrossLayerTranscoder:
    """Our transcoder from a fixed seed, with non-zero biases (so that copying them is checked) and identity
    normalization (so that both libraries see the same numbers)."""
    torch.manual_seed(0)
    L, d = shape.n_layers, shape.d_model
    clt = CrossLayerTranscoder(config)
    clt.set_normalization(torch.zeros(L, d), torch.ones(L, 1), torch.zeros(L, d), torch.ones(L, 1))
    with torch.no_grad():
        clt.b_enc.normal_(0.0, 0.01)
        clt.b_dec.normal_(0.0, 0.01)
    return clt


def batch(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random ``resid_mid`` and ``mlp_out``, each ``(batch, n_layers, d_model)``."""
    generator = torch.Generator().manual_seed(1)
    size = (shape.batch, shape.n_layers, shape.d_model)
    return torch.randn(size, generator=generator), torch.randn(size, generator=generator)


# ------------------------------------------------------------------------------------------------ sparsify


def sparsify_coder(clt: CrossLayerTranscoder):
    """eai-sparsify's TopK transcoder with our one-layer transcoder's weights."""
    from sparsify import SparseCoder, SparseCoderConfig

    config = SparseCoderConfig(activation="topk", num_latents=clt.d_features, k=clt.config.k, transcode=True)
    coder = SparseCoder(clt.d_model, config)
    with torch.no_grad():
        coder.encoder.weight.copy_(clt.W_enc[0].T)  # (F, d)
        coder.encoder.bias.copy_(clt.b_enc[0])
        coder.W_dec.copy_(clt.W_dec[0][:, 0])  # (F, d)
        coder.b_dec.copy_(clt.b_dec[0])
    return coder


def compare_sparsify(shape: Shape, dtype: torch.dtype, profiling: bool) -> float:
    """``ours/sparsify`` on one shape; prints both sides' ms/step."""
    config = CLTConfig(
        n_layers=1,
        d_model=shape.d_model,
        d_features=shape.d_features,
        activation_kind="topk",
        k=TOPK_K,
        cross_layer=False,
    )
    clt = build_ours(shape, config)
    coder = sparsify_coder(clt)
    x, y = batch(shape)  # (batch, 1, d_model)
    x2, y2 = x[:, 0], y[:, 0]  # (batch, d_model)

    def ours(decoding: str):
        return lambda: clt.loss(x, y, sparsity_coef=0.0, preact_coef=0.0, decoding=decoding)

    with torch.no_grad():  # in float32 whatever the timed dtype: see TOLERANCE
        our_loss, our_recon, theirs = ours("dense")(), clt(x).reconstruction, coder(x2, y2)
    check(shape, "FVU", our_loss.nmse[0].item(), theirs.fvu.item(), TOLERANCE)
    check_reconstruction(shape, our_recon[:, 0], theirs.sae_out, TOLERANCE)
    steps = {
        "sparsify": training_step(coder.parameters(), lambda: coder(x2, y2).fvu, dtype),
        "ours dense": training_step(clt.parameters(), lambda: ours("dense")().total, dtype),
    }
    steps["ours auto"] = training_step(clt.parameters(), lambda: ours("auto")().total, dtype)
    times = interleaved(steps, shape.warmup, shape.steps)
    print(
        f"{shape.name}: TopK transcoder d_model {shape.d_model}, {shape.d_features} latents, k {TOPK_K}, "
        f"batch {shape.batch}, {dtype_name(dtype)}; FVU ours {our_loss.nmse[0].item():.7f}, sparsify "
        f"{theirs.fvu.item():.7f}"
    )
    print(
        f"  sparsify {times['sparsify']}; ours dense {times['ours dense']}, auto {times['ours auto']} "
        "(median, min–max)"
    )
    if profiling:
        profile("ours (auto)", steps["ours auto"])
        profile("ours (dense)", steps["ours dense"])
        profile("sparsify", steps["sparsify"])
    return times["sparsify"].median / min(times["ours dense"].median, times["ours auto"].median)


# -------------------------------------------------------------------------------------------- llamascopium


def llamascopium_clt(clt: CrossLayerTranscoder):
    """llamascopium's JumpReLU CrossLayerTranscoder with our CLT's weights."""
    with warnings.catch_warnings():  # its CUDA-only autocast decorators warn on import without a GPU
        warnings.simplefilter("ignore", UserWarning)
        from llamascopium.models.clt import CLTConfig as PeerConfig
        from llamascopium.models.clt import CrossLayerTranscoder as PeerCLT

    L, d, F = clt.n_layers, clt.d_model, clt.d_features
    config = PeerConfig(
        d_model=d,
        expansion_factor=(F + 0.5) / d,  # d_sae = int(d_model · expansion_factor)
        act_fn="jumprelu",
        hook_points_in=[f"in{layer}" for layer in range(L)],
        hook_points_out=[f"out{layer}" for layer in range(L)],
        sparsity_include_decoder_norm=False,  # ours gates on the pre-activation alone
        jumprelu_threshold_window=clt.config.bandwidth,
        norm_activation="inference",  # no normalization of its own
        device="cpu",
        dtype=torch.float32,
    )
    peer = PeerCLT(config)
    assert config.d_sae == F, (config.d_sae, F)
    with torch.no_grad():
        peer.W_E.copy_(clt.W_enc)  # (L, d, F), the same layout
        peer.b_E.copy_(clt.b_enc)
        for target in range(L):
            # Its W_D[target] is (target + 1, F, d): the decoders from every source up to target.
            peer.W_D[target].copy_(torch.stack([clt.W_dec[s][:, target - s] for s in range(target + 1)]))
            peer.b_D[target].copy_(clt.b_dec[target])
    copy_thresholds(clt, peer)
    copied = {"W_E", "b_E", "activation_function.log_jumprelu_threshold"}
    copied |= {f"W_D.{t}" for t in range(L)} | {f"b_D.{t}" for t in range(L)}
    missed = {name for name, _ in peer.named_parameters()} - copied
    assert not missed, f"llamascopium parameters not set from ours: {sorted(missed)}"
    return peer


def copy_thresholds(clt: CrossLayerTranscoder, peer) -> None:
    with torch.no_grad():
        peer.activation_function.log_jumprelu_threshold.copy_(clt.activation.log_threshold)


def compare_llamascopium(shape: Shape, dtype: torch.dtype, density: float | None, profiling: bool) -> float:
    """``ours/llamascopium`` on one shape, thresholds at init (``density`` None, both dense) or set so that
    ``density`` of the features fire (ours ``auto``, llamascopium dense); prints both sides' ms/step."""
    L, d = shape.n_layers, shape.d_model
    clt = build_ours(shape, CLTConfig(n_layers=L, d_model=d, d_features=shape.d_features))
    x, y = batch(shape)
    if density is not None:
        set_density(clt, x, density)
    peer = llamascopium_clt(clt)
    inputs = {f"in{layer}": x[:, layer] for layer in range(L)} | {
        f"out{layer}": y[:, layer] for layer in range(L)
    }
    inputs["tokens"] = torch.zeros(shape.batch, dtype=torch.long)  # it counts tokens from this
    peer_kwargs = dict(
        sparsity_loss_type="tanh", tanh_stretch_coefficient=SPARSITY_C, l1_coefficient=SPARSITY_COEF * L * d
    )
    decoding = "dense" if density is None else "auto"

    def ours():
        return clt.loss(
            x,
            y,
            sparsity_coef=SPARSITY_COEF,
            sparsity_c=SPARSITY_C,
            preact_coef=PREACT_COEF,
            decoding=decoding,
        )

    with torch.no_grad():  # in float32 whatever the timed dtype: see TOLERANCE
        our_loss, our_recon = ours(), clt(x).reconstruction
        theirs = peer.compute_loss(inputs, **peer_kwargs)
        l0 = our_loss.l0.mean().item()
    their_recon = theirs["reconstructed"].transpose(0, 1)  # (batch, L, d)
    variance = (y - y.mean(0)).pow(2).sum((0, 2))  # (L,)
    their_fvu = ((their_recon.float() - y).pow(2).sum((0, 2)) / variance).mean().item()
    check_reconstruction(shape, our_recon, their_recon, TOLERANCE)
    check(shape, "MSE", our_loss.mse.item(), theirs["l_rec"].item() / d, TOLERANCE)
    check(shape, "FVU", our_loss.nmse.mean().item(), their_fvu, TOLERANCE)
    ours_without_preact = (our_loss.total - PREACT_COEF * our_loss.preact).item()
    check(shape, "loss (MSE + λ·sparsity)", ours_without_preact, theirs["loss"].item() / d, TOLERANCE)
    steps = {
        "llamascopium": training_step(
            peer.parameters(), lambda: peer.compute_loss(inputs, **peer_kwargs)["loss"], dtype
        ),
        "ours": training_step(clt.parameters(), lambda: ours().total, dtype),
    }
    times = interleaved(steps, shape.warmup, shape.steps)
    print(
        f"{shape.name}: JumpReLU CLT L{L} d_model {d} F{shape.d_features} batch {shape.batch}, "
        f"{dtype_name(dtype)}, L0/F {l0 / shape.d_features:.3f}; FVU ours {our_loss.nmse.mean().item():.7f}, "
        f"llamascopium {their_fvu:.7f}"
    )
    print(
        f"  llamascopium (dense) {times['llamascopium']}; ours ({decoding}) {times['ours']} (median, "
        f"min–max); ratio {times['llamascopium'].median / times['ours'].median:.2f}"
    )
    if profiling:
        profile(f"ours ({decoding})", steps["ours"])
        profile("llamascopium", steps["llamascopium"])
    return times["llamascopium"].median / times["ours"].median


# -------------------------------------------------------------------------------------------------- main


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="a subset to run"
    )
    parser.add_argument("--steps", type=int, help="timed steps per side (default: per shape, 5 to 7)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per side first (default: per shape, 1 or 2)"
    )
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps per side")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--profile", action="store_true", help="print each side's top operators for one step")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if not in_peer_venv():
        python = peer_python()
        sys.exit(subprocess.run([str(python), str(Path(__file__).resolve()), *sys.argv[1:]]).returncode)
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder is for GPUs
    start = time.perf_counter()
    if len(args.shapes) > 1:
        results = {}
        for name in args.shapes:
            for label, ratio in run_alone(args, name).items():
                results.setdefault(label, []).append(ratio)
        report(results, start)
        return
    dtype = getattr(torch, args.dtype)
    results: dict[str, list[float]] = {
        "ours/sparsify": [],
        "ours/llamascopium_dense": [],
        "ours/llamascopium_sparse": [],
    }
    for name in args.shapes:
        shape = SHAPES[name]
        if args.quick:
            shape = shape._replace(steps=2, warmup=1)
        shape = shape._replace(
            steps=args.steps or shape.steps, warmup=shape.warmup if args.warmup is None else args.warmup
        )
        if shape.peer == "sparsify":
            results["ours/sparsify"].append(compare_sparsify(shape, dtype, args.profile))
        else:
            results["ours/llamascopium_dense"].append(compare_llamascopium(shape, dtype, None, args.profile))
            results["ours/llamascopium_sparse"].append(
                compare_llamascopium(shape, dtype, DENSITY, args.profile)
            )
    report(results, start)


def run_alone(args: argparse.Namespace, shape: str) -> dict[str, float]:
    """Run one shape in a process of its own, echo its output, and return its ``label = ratio`` lines. A fresh
    process per shape: glibc raises its mmap threshold after large frees, so a step timed after a bigger shape
    allocates from warm memory (sparsify's TopK step ran 435 instead of 670 ms after the CLT shapes)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--shapes", shape, "--dtype", args.dtype]
    command += ["--steps", str(args.steps)] if args.steps else []
    command += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    command += ["--quick"] * args.quick + ["--profile"] * args.profile
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = child.stdout.splitlines()
    # its summary lines are reported once, by the parent
    shown = [line for line in lines if not line.startswith(("ours/", "("))]
    print("\n".join(shown), flush=True)
    if child.returncode:
        sys.exit(f"{shape}: exit status {child.returncode}")
    return {
        label: float(value)
        for label, _, value in (line.partition(" = ") for line in lines)
        if label.startswith("ours/")
    }


def report(results: dict[str, list[float]], start: float) -> None:
    print(f"({time.perf_counter() - start:.0f} s in all; the smaller ratio over the shapes run)")
    for label, ratios in results.items():
        if ratios:
            print(f"{label} = {min(ratios):.2f}")


if __name__ == "__main__":
    main()
