"""Seconds per attribution graph on smollm2-135m with the default run's CLT, and how close it comes to its core.

For each prompt: the wall time of ``cltlab.attribute`` (the same settings as the circuit-tracer anchor below), the
number of backward passes it made (counted), and the time of one bare batched backward pass of the same size
through the same frozen model (a random injection at the last layer, so it spans every layer). Printed:

    attribution/backward = n_backward_passes × bare backward ÷ attribution time   (1 would be all core)
    anchor/ours          = circuit-tracer 0.5.0's time for the same prompt ÷ ours

Target blocks are sorted by layer, so most passes stop below the last layer and are cheaper than the bare pass:
``backward_share`` (time inside the backward passes as they ran ÷ attribution time) is the stricter figure.

The anchor (measured 2026-12-01 on this 2-core CPU, the default run's exported CLT, ``max_feature_nodes=2000``,
batch 64, 5 logits): 312 s for "To be, or not to be, that is the" and 109 s for "The capital of France is".
Usage: python benchmarks/attribution.py [--run runs/default] [--max-features 2000] [--batch 64] [--logits 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import cltlab
from cltlab.attribution.local import LocalReplacement, prompt_ids

ANCHOR = {"To be, or not to be, that is the": 312.0, "The capital of France is": 109.0}


def bare_backward(model, ids, batch: int, repeats: int = 3) -> float:
    """Seconds of one backward pass of ``batch`` targets through the frozen model (leaves as in ``attribute``)."""
    local = LocalReplacement(model, ids)
    embed = local.prompt.embeddings.expand(batch, -1, -1).clone().requires_grad_()
    mlp = [
        local.prompt.mlp_out[:, i].expand(batch, -1, -1).clone().requires_grad_()
        for i in range(model.n_layers)
    ]
    with torch.enable_grad():
        resid, _ = local.run(batch=batch, embeddings=embed, mlp_fn=lambda layer, _: mlp[layer])
    grad = torch.randn_like(resid[-1])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.autograd.grad([resid[-1]], [embed, *mlp], [grad], retain_graph=True, allow_unused=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="a finished `make run` folder")
    parser.add_argument("--max-features", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--logits", type=int, default=5)
    parser.add_argument("--prompts", nargs="*", default=list(ANCHOR))
    args = parser.parse_args()
    paths = cltlab.run.run_paths("default", args.run)
    if not (paths.clt / "config.json").exists():
        raise SystemExit(f"No trained CLT in {paths.clt}: run `make run` first (or pass --run).")
    torch.manual_seed(0)
    model = cltlab.load_model("smollm2-135m")
    clt = cltlab.CrossLayerTranscoder.load(paths.clt)
    passes, inside = [0], [0.0]
    grad = torch.autograd.grad

    def counted(*a, **k):
        passes[0] += 1
        start = time.perf_counter()
        try:
            return grad(*a, **k)
        finally:
            inside[0] += time.perf_counter() - start

    for prompt in args.prompts:
        ids = prompt_ids(model, prompt)
        passes[0], inside[0] = 0, 0.0
        torch.autograd.grad = counted
        try:
            start = time.perf_counter()
            graph = cltlab.attribute(
                model, clt, prompt, max_features=args.max_features, batch_size=args.batch,
                max_logits=args.logits, progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - start
        finally:
            torch.autograd.grad = grad
        bare = bare_backward(model, ids, args.batch)
        scores = graph.scores()
        pruned = graph.prune()
        print(f"# {prompt!r}: {len(ids)} tokens with BOS, {len(graph.active_features)} active features, "
              f"{graph.n_features} feature nodes, {graph.n_logits} logits, {graph.n_nodes} nodes, "
              f"{int((graph.adjacency != 0).sum())} non-zero edges; pruned {int(pruned.node_mask.sum())} nodes, "
              f"{int(pruned.edge_mask.sum())} edges")  # fmt: skip
        print(f"# {passes[0]} backward passes × {bare:.3f} s bare backward (batch {args.batch})")
        key = f"[{len(ids)} tokens]"
        print(f"seconds{key} = {seconds:.1f}")
        print(f"attribution/backward{key} = {passes[0] * bare / seconds:.2f}")
        print(f"backward_share{key} = {inside[0] / seconds:.2f}")
        print(f"replacement_score{key} = {scores.replacement:.3f}")
        print(f"completeness_score{key} = {scores.completeness:.3f}")
        if prompt in ANCHOR:
            print(f"anchor/ours{key} = {ANCHOR[prompt] / seconds:.1f}")


if __name__ == "__main__":
    main()
