"""Training-step speed of the CLT, measured side by side in one run, in the precision training would use: bf16
autocast on a GPU or a CPU with fast bf16, float32 on a CPU without it (``cltlab.precision``; ``--dtype`` overrides).

- ``ours/seed_masked``: steps/s of our per-source-layer decoder ÷ steps/s of a dense masked [L, L, F, d]
  decoder (the seed's layout) of the same sizes, both with the same encoder, loss terms and Adam.
- ``step_flops/matmul_flops``: achieved FLOP/s of a whole training step (6 · tokens · weights, encoder and
  decoder) ÷ FLOP/s of the bare matmuls of the same shapes and dtype (forward, input and weight gradients).
- ``sparse/dense``: steps/s with sparse decoding ÷ steps/s with dense decoding, with the JumpReLU thresholds set
  so that ``--density`` (default 2%) of the features fire, as in a trained CLT.

Usage: python benchmarks/train_speed.py [--layers 30 --d-model 576 --features 256 --batch 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from cltlab import CrossLayerTranscoder
from cltlab.config import CLTConfig
from cltlab.precision import fast_bfloat16_cpu

DTYPE = torch.bfloat16
"""The compute dtype of every timing (set from ``--dtype`` in ``main``)."""


class SeedMaskedDecoder(torch.nn.Module):
    """The seed's layout: W_dec (L, L, F, d) with the lower triangle masked away (all FLOPs still done)."""

    def __init__(self, clt: CrossLayerTranscoder):
        super().__init__()
        L, F, d = clt.n_layers, clt.d_features, clt.d_model
        self.W_dec = torch.nn.Parameter(torch.randn(L, L, F, d) / (L * d) ** 0.5)
        self.register_buffer("mask", torch.ones(L, L).triu())  # source s writes to targets t >= s

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (batch, L, F) -> (batch, L, d)
        return torch.einsum("bsf,stfd->btd", features, self.W_dec * self.mask[..., None, None])


def timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls, after one warm-up call (GPU work synchronized)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def step_time(
    clt: CrossLayerTranscoder,
    decoder,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    decoding: str = "dense",
    loss_fn=None,
) -> float:
    params = list(clt.parameters()) + (list(decoder.parameters()) if decoder is not None else [])
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    device = x.device.type

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=DTYPE == torch.bfloat16):
            if decoder is None:
                loss = (loss_fn or clt.loss)(x, y, sparsity_coef=1e-4, decoding=decoding).total
            else:
                features = clt.encode(x)
                loss = (decoder(features) - y).float().pow(2).mean() + 1e-4 * features.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps)


def matmul_time(clt: CrossLayerTranscoder, batch: int, device: str, repeats: int) -> float:
    """One step's worth of bare matmuls: encoder and every decoder block, forward and both gradients."""
    L, F, d = clt.n_layers, clt.d_features, clt.d_model
    kind = dict(dtype=DTYPE, device=device)
    shapes = [(d, F)] * L + [(F, clt.n_targets(s) * d) for s in range(L)]
    tensors = [
        (torch.randn(batch, k, **kind), torch.randn(k, n, **kind), torch.randn(batch, n, **kind))
        for k, n in shapes
    ]

    def run() -> None:
        for a, w, g in tensors:
            a @ w  # forward
            g @ w.T  # input gradient
            a.T @ g  # weight gradient

    return timed(run, repeats)


@torch.no_grad()
def set_density(clt: CrossLayerTranscoder, x: torch.Tensor, density: float) -> None:
    """Set every threshold to the (1 − density) quantile of its layer's pre-activations on ``x``."""
    pre = clt.preactivations(x).transpose(0, 1).flatten(1)  # (n_layers, batch · d_features)
    pre = pre[:, : 1 << 24]  # quantile takes at most 16M values
    theta = torch.quantile(pre.float(), 1 - density, dim=1).clamp_min(1e-3)
    clt.activation.log_threshold.copy_(theta.log()[:, None].expand_as(clt.activation.log_threshold))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.02, help="L0/F for the sparse/dense comparison")
    parser.add_argument("--compile", action="store_true", help="torch.compile our loss (trainer.compile)")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="default: what training would use here"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    global DTYPE
    fast_bf16 = device == "cuda" or fast_bfloat16_cpu()
    DTYPE = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if fast_bf16 else torch.float32
    torch.manual_seed(0)
    config = CLTConfig(n_layers=args.layers, d_model=args.d_model, d_features=args.features)
    clt = CrossLayerTranscoder(config).to(device)
    x = torch.randn(args.batch, args.layers, args.d_model, device=device)
    y = torch.randn(args.batch, args.layers, args.d_model, device=device)
    loss_fn = torch.compile(clt.loss) if args.compile else None
    step_time(clt, None, x, y, 1, "dense", loss_fn)  # compile (and warm) outside the timings
    step_time(clt, None, x, y, 1, "auto", loss_fn)
    ours = step_time(clt, None, x, y, args.steps, "dense", loss_fn)
    seed = step_time(clt, SeedMaskedDecoder(clt).to(device), x, y, args.steps)
    decoder_weights = sum(W.numel() for W in clt.W_dec)
    flops = 6 * args.batch * (clt.W_enc.numel() + decoder_weights)
    bare = matmul_time(clt, args.batch, device, args.steps)
    set_density(clt, x, args.density)
    with torch.no_grad():
        density = (clt.encode(x) > 0).float().mean().item()
    dense = step_time(clt, None, x, y, args.steps, "dense", loss_fn)
    sparse = step_time(clt, None, x, y, args.steps, "auto", loss_fn)
    print(
        f"{device}: L={args.layers} d={args.d_model} F={args.features} batch={args.batch}"
        + (" (our loss torch.compile'd)" if args.compile else "")
    )
    print(
        f"our step {ours * 1e3:.0f} ms ({args.batch / ours:,.0f} tok/s), seed masked step {seed * 1e3:.0f} ms"
    )
    print(f"step {flops / ours / 1e12:.3f} TFLOP/s, bare {DTYPE} matmuls {flops / bare / 1e12:.3f} TFLOP/s")
    print(
        f"at L0/F = {density:.3f}: dense decoding {dense * 1e3:.0f} ms/step, sparse (auto) {sparse * 1e3:.0f} ms/step"
    )
    print(f"ours/seed_masked = {seed / ours:.2f}")
    print(f"step_flops/matmul_flops = {bare / ours:.2f}")
    print(f"sparse/dense = {dense / sparse:.2f}")


if __name__ == "__main__":
    main()
