"""features/encode: feature-statistics tokens/s ÷ CLT encode-only tokens/s, same buffer, side by side.

Both passes read the same buffer blocks and encode every layer with ``encode_layer`` (the least any pass over the
features must do); the statistics pass adds the frequencies, maxima, means, activation histograms and top-k
rows. The CLT has the default profile's shape on the chosen model, with random weights whose thresholds are set so
that a ``--density`` fraction of features fire (trained CLTs are sparse; the cost of the histograms and top-k
grows with the density). Each pass runs ``--repeats`` times, alternating; the best time of each counts.

``switch/forward``: seconds the FeatureBrowser takes per change of feature (features of several layers, in
turn) ÷ seconds of one model forward over one context window as the browser shows it (BOS + before + 1 + after
tokens). The statistics keep each page's contexts, activations and logit tables, so a switch runs no model;
``switch_recomputed/forward`` is the same browser on statistics without them (it recomputes the contexts'
activations through the model, as every switch did before).
Usage: python benchmarks/features.py [--model smollm2-135m] [--tokens 8192] [--d-features 256] [--density 0.05]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import cltlab


@torch.no_grad()
def encode_only(clt: cltlab.CrossLayerTranscoder, buffer: cltlab.DiscBuffer, block_size: int) -> None:
    for start in range(0, buffer.n_tokens, block_size):
        resid = buffer.read(start, min(start + block_size, buffer.n_tokens)).resid_mid
        for layer in range(clt.n_layers):
            clt.encode_layer(resid[:, layer].float(), layer)


@torch.no_grad()
def random_clt(buffer: cltlab.DiscBuffer, d_features: int, density: float) -> cltlab.CrossLayerTranscoder:
    """Random weights, the buffer's normalization, thresholds at each feature's (1 - density) quantile."""
    torch.manual_seed(0)
    config = cltlab.config.CLTConfig(
        n_layers=buffer.n_layers,
        d_model=buffer.d_model,
        d_features=d_features,
        layer_offset=buffer.layer_start,
    )
    clt = cltlab.CrossLayerTranscoder(config)
    clt.set_normalization(*buffer.stats)
    x = buffer.read(0, min(2048, buffer.n_tokens)).resid_mid.float()  # (rows, n_layers, d_model)
    pre = clt.preactivations(x)  # (rows, n_layers, d_features)
    clt.activation.log_threshold.copy_(pre.quantile(1 - density, dim=0).clamp_min(1e-3).log())
    return clt.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-features", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.05, help="fraction of features active per token")
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = cltlab.config.HarvestConfig(
        model=args.model, n_tokens=args.tokens, seq_len=128, batch_size=16, model_dtype="bfloat16"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cltlab.harvest(config, Path(tmp) / "activations", progress=False)
        buffer = cltlab.DiscBuffer(Path(tmp) / "activations")
        clt = random_clt(buffer, args.d_features, args.density)
        n = buffer.n_tokens

        def stats():
            return cltlab.feature_statistics(clt, buffer, block_size=args.block_size, progress=False)

        encode_s = stats_s = float("inf")
        for _ in range(args.repeats):  # alternate, so both see the same machine
            encode_s = min(encode_s, timed(lambda: encode_only(clt, buffer, args.block_size)))
            stats_s = min(stats_s, timed(stats))
        active = stats().frequency.mean().item()
        model = cltlab.load_model(args.model)  # float32, as the notebooks load it for the browser
        paged = cltlab.feature_statistics(clt, buffer, model=model, progress=False)
        bare = dataclasses.replace(paged, **dict.fromkeys(paged.PAGE_TENSORS))
        switch_s, recomputed_s = (seconds_per_switch(s, clt, model, buffer) for s in (paged, bare))
        window = torch.full((1, 1 + 12 + 1 + 4), model.bos_token_id)  # the browser's default window
        with torch.no_grad():
            forward_s = min(timed(lambda: model.model(window)) for _ in range(10))
    print(
        f"{args.model}: {n:,} tokens × {clt.n_layers} layers × {clt.d_features} features ({active:.1%} active): "
        f"encode-only {n / encode_s:,.0f} tok/s, feature statistics {n / stats_s:,.0f} tok/s"
    )
    print(
        f"per feature switch: {switch_s * 1e3:.1f} ms from the statistics, {recomputed_s * 1e3:.0f} ms recomputing "
        f"through the model; one forward over a context window: {forward_s * 1e3:.1f} ms"
    )
    print(f"features/encode = {encode_s / stats_s:.2f}")
    print(f"switch/forward = {switch_s / forward_s:.3f}")
    print(f"switch_recomputed/forward = {recomputed_s / forward_s:.1f}")


def seconds_per_switch(stats, clt, model, buffer) -> float:
    """Mean seconds per ``FeatureBrowser.show`` over the 4 most frequent features of 5 layers (after a warm-up)."""
    browser = cltlab.FeatureBrowser(stats, clt, model, buffer)
    layers = range(0, stats.n_layers, max(1, stats.n_layers // 5))
    picks = [(layer, f) for layer in layers for f in stats.order(layer, "frequency")[:4]]
    browser.show(*picks[-1])
    return timed(lambda: [browser.show(layer, feature) for layer, feature in picks]) / len(picks)


if __name__ == "__main__":
    main()
