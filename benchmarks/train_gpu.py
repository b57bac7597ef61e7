"""GPU training throughput of a GPT-2-small-shaped CLT, and side by side the data path that would feed it.

- Training: a CLT of 12 layers, d_model 768, 8192 features per layer (566M weights) on random activations, bf16
  autocast and fused Adam; tokens/s and model FLOP utilisation (6 · tokens · weights per step ÷ the bf16 matmul
  FLOP/s of an 8192³ product measured in this run), with dense decoding and with sparse (auto) decoding at the
  ``--density`` a trained CLT has. Sparse and dense gradients are compared first.
- Data path: a synthetic bf16 harvest folder of the same shape, read as shuffled DiscBuffer batches into pinned
  memory — by DataLoader workers, and by reader threads (``TrainConfig.reader_threads``) — and copied to the GPU:
  tokens/s.

Usage: python benchmarks/train_gpu.py [--features 8192 --batch 4096 --rows 65536 --workers 8 --compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from buffer import make_folder
from train_speed import set_density, step_time, timed

from cltlab import CrossLayerTranscoder, DiscBuffer
from cltlab.config import CLTConfig
from cltlab.data import EpochSampler, ThreadedBatches


def matmul_tflops(device: str, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, 10) / 1e12


def check_sparse_equals_dense(clt, x, y) -> float:
    """Largest relative difference between sparse and dense gradients (float32, no autocast)."""
    grads = {}
    for mode in ("dense", "sparse"):
        clt.zero_grad(set_to_none=True)
        clt.loss(x, y, sparsity_coef=1e-4, decoding=mode).total.backward()
        grads[mode] = [p.grad.clone() for p in clt.parameters() if p.grad is not None]
    clt.zero_grad(set_to_none=True)
    return max(
        ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        for a, b in zip(grads["sparse"], grads["dense"], strict=True)
    )


def data_tokens_per_s(
    rows: int, layers: int, d_model: int, batch: int, workers: int, device: str
) -> tuple[float, float]:
    """Tokens/s from disc (page cache) to ``device``: through DataLoader workers, and through reader threads."""
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), rows, layers, d_model)
        buffer = DiscBuffer(tmp, batch_size=batch)
        pin = device == "cuda"
        loader = torch.utils.data.DataLoader(
            buffer,
            batch_size=None,
            sampler=EpochSampler(len(buffer)),
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
        threaded = ThreadedBatches(buffer, EpochSampler(len(buffer)), threads=workers, pin_memory=pin)

        def rate(batches) -> float:
            iterator = iter(batches)
            n, start = 0, 0.0
            for i in range(2 * len(buffer)):  # the first epoch warms the page cache and the workers
                if i == len(buffer):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    n, start = 0, time.perf_counter()
                b = next(iterator)
                x = b.resid_mid.to(device, non_blocking=True)
                b.mlp_out.to(device, non_blocking=True)
                n += x.shape[0]
            if device == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        return rate(loader), rate(threaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd loss")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    torch.manual_seed(0)
    L, d, F, B = args.layers, args.d_model, args.features, args.batch

    small = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=64, d_features=256)).to(device)
    xs, ys = torch.randn(256, L, 64, device=device), torch.randn(256, L, 64, device=device)
    set_density(small, xs, 0.05)
    print(
        f"sparse vs dense gradients, largest relative difference: {check_sparse_equals_dense(small, xs, ys):.2e}"
    )

    peak = matmul_tflops(device)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, d_features=F)).to(device)
    weights = clt.W_enc.numel() + sum(W.numel() for W in clt.W_dec)
    flops = 6 * B * weights
    x, y = torch.randn(B, L, d, device=device), torch.randn(B, L, d, device=device)
    set_density(clt, x, args.density)
    dense = step_time(clt, None, x, y, args.steps, "dense")
    sparse = step_time(clt, None, x, y, args.steps, "auto")
    print(
        f"{name}: CLT L={L} d={d} F={F} ({weights / 1e6:.0f}M weights), {B} tokens per step, L0/F={args.density}"
    )
    print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    print(
        f"dense decoding:  {dense * 1e3:.1f} ms/step, {B / dense:,.0f} tok/s, {flops / dense / 1e12:.0f} TFLOP/s"
    )
    print(f"sparse decoding: {sparse * 1e3:.1f} ms/step, {B / sparse:,.0f} tok/s")
    compiled_times = []
    if args.compile:
        compiled = torch.compile(clt.loss)
        start = time.perf_counter()
        step_time(clt, None, x, y, 1, "dense", compiled)
        print(f"torch.compile warm-up {time.perf_counter() - start:.0f} s")
        step = step_time(clt, None, x, y, args.steps, "dense", compiled)
        print(f"compiled dense:  {step * 1e3:.1f} ms/step, {B / step:,.0f} tok/s")
        compiled_times.append(step)
    del clt, x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    loader, threads = data_tokens_per_s(args.rows, L, d, B, args.workers, device)
    data = max(loader, threads)
    print(
        f"data path: DiscBuffer -> DataLoader({args.workers} workers, pinned) -> {device}: {loader:,.0f} tok/s"
    )
    print(
        f"data path: DiscBuffer -> {args.workers} reader threads (pinned) -> {device}: {threads:,.0f} tok/s"
    )
    print(f"gpu_train_tokens_per_s = {B / dense:.0f}")
    print(f"gpu_sparse_train_tokens_per_s = {B / sparse:.0f}")
    print(f"gpu_mfu = {flops / dense / 1e12 / peak:.2f}")
    if compiled_times:
        print(f"gpu_compiled_train_tokens_per_s = {B / compiled_times[0]:.0f}")
        print(f"gpu_compiled_mfu = {flops / compiled_times[0] / 1e12 / peak:.2f}")
    print(f"gpu_data_tokens_per_s = {data:.0f}")
    print(f"threads/dataloader = {threads / loader:.2f}")
    print(f"data/train = {data / (B / min(dense, sparse, *compiled_times)):.2f}")


if __name__ == "__main__":
    main()
