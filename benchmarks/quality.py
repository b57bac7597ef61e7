"""CLT vs per-layer transcoder (PLT) at matched L0, on the embedded smollm2-135m: the paper's headline result.

Both have ``--features`` features per covered layer (the same total); the PLT is ``TrainConfig.cross_layer=False``.
Everything else is the ``default`` profile (corpus, harvest, batch, precision) at ``--lr`` (6e-4) with every
layer's error weighted alike (the settings the README's table was measured with), shrunk to a CPU budget: a range
of layers (``--layers``, the replacement model then swaps only those MLPs) and ``--steps``.

Matching L0: the CLT trained with ``--clt-lambda`` sets the target mean L0 (unless ``--target-l0`` is given);
each kind then searches its sparsity penalty λ — a secant step on log L0 vs log λ through the runs so far — for
at most ``--max-runs`` runs, stopping once a run's L0 is within ``--tolerance`` of the target. The run closest
to the target represents each kind; when two runs of a kind bracket the target, its metrics are also
interpolated to the target L0 (linear in log L0), which removes what is left of the mismatch. ``--sweep`` adds
runs at half and twice each matched λ and compares the CLT with the PLT at every CLT run's L0 (a frontier).

Metrics, all on held-out text (the corpus's ``eval`` split): L0, NMSE (mean over layers), CE loss recovered, KL
and top-1 agreement from ``cltlab.evaluate``; dead % = features that never fire on ``--heldout-tokens`` harvested
held-out tokens (``cltlab.feature_statistics``). Each run is kept under ``--out`` with its metrics, so running
again reuses finished runs. The last lines are ``name = value``.
With ``--graphs N`` (needs ``--layers all``), the paper's second result: mean replacement and completeness scores
and influence-weighted path length of attribution graphs of the matched CLT and PLT on the same N held-out prompts.
Usage: python benchmarks/quality.py [--quick] [--layers 0:12] [--steps 600] [--features 256] [--tokens 60000]
       python benchmarks/quality.py --buffer runs/default/activations --graphs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import transformers

import cltlab
from cltlab.corpus import token_sequences

KINDS = {"clt": True, "plt": False}  # name -> TrainConfig.cross_layer
SLOPE_GUESS = -0.5  # d log L0 / d log λ before a kind has two runs (measured: -0.44, PLT of layers 0-11)


class Run(NamedTuple):
    """One trained transcoder and its held-out metrics."""

    kind: str
    lam: float
    l0: float
    nmse: float
    ce_recovered: float
    kl: float
    top1: float
    dead_frac: float
    train_s: float


METRICS = ("l0", "nmse", "ce_recovered", "kl", "top1", "dead_frac")


def parse_layers(text: str) -> tuple[int, int] | None:
    """``"0:12"`` → ``(0, 12)``; ``"all"`` → None (every layer)."""
    if text == "all":
        return None
    start, stop = (int(v) for v in text.split(":"))
    return start, stop


def next_lambda(runs: list[Run], target: float, max_factor: float = 10.0) -> float:
    """λ expected to give mean L0 ``target``: a secant step on log L0 vs log λ through the two runs closest to
    the target (``SLOPE_GUESS`` with one run, or when the two disagree on the direction); at most
    ``max_factor`` away from the closest run's λ."""
    ranked = sorted(runs, key=lambda r: abs(math.log(r.l0 / target)))
    best = ranked[0]
    slope = SLOPE_GUESS
    others = [r for r in ranked[1:] if r.lam != best.lam and r.l0 != best.l0]
    if others:
        fitted = math.log(others[0].l0 / best.l0) / math.log(others[0].lam / best.lam)
        if fitted < 0:
            slope = fitted
    step = math.log(target / best.l0) / slope
    step = max(-math.log(max_factor), min(math.log(max_factor), step))
    return float(f"{best.lam * math.exp(step):.3g}")


def closest(runs: list[Run], target: float) -> Run:
    """The run whose mean L0 is closest to ``target`` (in ratio)."""
    return min(runs, key=lambda r: abs(math.log(r.l0 / target)))


def interpolate(runs: list[Run], target: float) -> dict[str, float] | None:
    """Every metric at L0 = ``target``, linear in log L0 between the nearest runs on either side; None unless
    two runs bracket the target."""
    below = [r for r in runs if r.l0 <= target]
    above = [r for r in runs if r.l0 > target]
    if not below or not above:
        return None
    lo, hi = max(below, key=lambda r: r.l0), min(above, key=lambda r: r.l0)
    t = math.log(target / lo.l0) / math.log(hi.l0 / lo.l0)
    return {m: getattr(lo, m) + t * (getattr(hi, m) - getattr(lo, m)) for m in METRICS}


def frontier(runs: list[Run]) -> dict[float, float]:
    """Print each CLT run beside the PLT interpolated to its L0 (where two PLT runs bracket it); return
    ``{clt L0: PLT NMSE / CLT NMSE}``."""
    plt, ratios = [r for r in runs if r.kind == "plt"], {}
    print(f"\nfrontier: each CLT run and the PLT at its L0 (interpolated):\n{HEADER}")
    for clt in sorted((r for r in runs if r.kind == "clt"), key=lambda r: r.l0):
        print(row("clt", clt.lam, clt._asdict()))
        at = interpolate(plt, clt.l0)
        if at is not None:
            print(row("plt interp.", "-", {**at, "l0": clt.l0}))
            ratios[clt.l0] = at["nmse"] / clt.nmse
    return ratios


def row(name: str, lam: float | str, values: dict[str, float]) -> str:
    lam = lam if isinstance(lam, str) else f"{lam:.3g}"
    return (
        f"{name:<12} {lam:>8} {values['l0']:>8.1f} {values['nmse']:>7.4f} {values['ce_recovered']:>8.4f} "
        f"{values['kl']:>7.4f} {values['top1']:>6.3f} {100 * values['dead_frac']:>6.1f}"
    )


HEADER = (
    f"{'model':<12} {'λ':>8} {'mean L0':>8} {'NMSE':>7} {'CE rec.':>8} {'KL':>7} {'top-1':>6} {'dead %':>6}"
)


class Bench:
    """Trains and evaluates runs of either kind on one harvest, caching each under ``root``."""

    def __init__(
        self,
        args: argparse.Namespace,
        harvest: cltlab.config.HarvestConfig,
        buffer: Path,
        heldout: Path,
        model,
    ):
        profile = cltlab.config.get_profile("default")
        self.args, self.harvest, self.model, self.profile = args, harvest, model, profile
        self.buffer, self.heldout = cltlab.DiscBuffer(buffer), cltlab.DiscBuffer(heldout)
        self.eval = dataclasses.replace(profile.eval, n_sequences=args.eval_sequences)
        self.root = Path(args.out) / f"runs_{buffer.name}"

    def train_config(self, kind: str, lam: float) -> cltlab.config.TrainConfig:
        return self.profile.train.replace(
            cross_layer=KINDS[kind],
            d_features=self.args.features,
            max_steps=self.args.steps,
            batch_size=self.args.batch,
            sparsity_coef=lam,
            lr=self.args.lr,
            layer_weighting="uniform",
            wandb=False,
            log_every=max(1, self.args.steps // 20),
            checkpoint_every=self.args.steps,
        )

    def run_dir(self, kind: str, lam: float) -> Path:
        config = self.train_config(kind, lam)
        return (
            self.root
            / f"{kind}_F{config.transcoder.d_features}_S{config.trainer.max_steps}_B{config.data.batch_size}_lam{lam:.3g}"
        )

    def __call__(self, kind: str, lam: float) -> Run:
        config = self.train_config(kind, lam)
        run_dir = self.run_dir(kind, lam)
        key = dict(
            train=dataclasses.asdict(config),
            buffer=self.buffer.summary(),
            heldout=self.heldout.summary(),
            eval=dataclasses.asdict(self.eval),
        )
        saved = run_dir / "quality.json"
        if saved.exists() and json.loads(saved.read_text())["key"] == key:
            return Run(**json.loads(saved.read_text())["run"])
        start = time.perf_counter()
        result = cltlab.train(config, self.buffer.path, run_dir, enable_progress_bar=False)
        shutil.rmtree(result.checkpoint_dir, ignore_errors=True)  # a 12-layer CLT's are ~160 MB each
        train_s = time.perf_counter() - start
        metrics = cltlab.evaluate(
            self.model,
            result.clt,
            corpus=self.harvest.corpus,
            seq_len=self.harvest.seq_len,
            config=self.eval,
            progress=False,
        )
        stats = cltlab.feature_statistics(result.clt, self.heldout, progress=False)
        run = Run(
            kind=kind,
            lam=lam,
            l0=metrics.mean_l0,
            nmse=sum(metrics.nmse) / len(metrics.nmse),
            ce_recovered=metrics.ce_recovered,
            kl=metrics.kl,
            top1=metrics.top1_agreement,
            dead_frac=(stats.frequency == 0).float().mean().item(),
            train_s=train_s,
        )
        saved.write_text(json.dumps(dict(key=key, run=run._asdict(), metrics=metrics.to_dict()), indent=2))
        return run

    def match(self, kind: str, lam: float, target: float | None, runs: list[Run]) -> float:
        """Runs of ``kind`` from ``lam`` until one is within tolerance of ``target`` (the first run's L0 when
        None); appends them to ``runs`` and returns the target."""
        mine: list[Run] = []
        while True:
            run = self(kind, lam)
            mine.append(run)
            runs.append(run)
            print(f"{row(kind, lam, run._asdict())}   ({run.train_s:.0f} s training)", flush=True)
            target = target or run.l0
            if abs(run.l0 / target - 1) <= self.args.tolerance or len(mine) >= self.args.max_runs:
                return target
            lam = next_lambda(mine, target)
            if any(r.lam == lam for r in mine):
                return target


def path_length(graph) -> float:
    """Mean length (in edges) of the paths by which influence flows from the logits back to the tokens: each
    step of ``w Â^k`` that lands on token nodes, weighted by how much lands there."""
    from cltlab.attribution.graph import normalize_rows

    normalized = normalize_rows(graph.adjacency)
    current, total, weighted = graph.logit_weights() @ normalized, 0.0, 0.0
    for k in range(1, 4 * graph.n_layers + 4):
        arrived = float(current[graph.token_start : graph.logit_start].sum())
        total, weighted = total + arrived, weighted + k * arrived
        current = current @ normalized
        if not current.any():
            break
    return weighted / total if total else float("nan")


def graph_scores(bench: Bench, picked: dict[str, Run], args: argparse.Namespace) -> None:
    """The paper's second result: replacement and completeness scores (and path length) of each kind's graphs
    on the same held-out prompts (the first ``--graph-tokens`` tokens of eval-split sequences)."""
    sequences = token_sequences(
        bench.harvest.corpus,
        bench.model.tokenizer,
        seq_len=args.graph_tokens,
        bos_token_id=bench.model.bos_token_id,
        split="eval",
    )
    prompts = [next(sequences)[0] for _ in range(args.graphs)]
    print(f"\nattribution graphs on {len(prompts)} held-out prompts of {args.graph_tokens} tokens "
          f"(max {args.graph_features} feature nodes):")  # fmt: skip
    print(f"{'model':<6} {'replacement':>11} {'completeness':>12} {'path length':>11} {'s/graph':>8}")
    for kind, run in picked.items():
        clt = cltlab.CrossLayerTranscoder.load(bench.run_dir(kind, run.lam) / "clt")
        scores, lengths, start = [], [], time.perf_counter()
        for ids in prompts:
            graph = cltlab.attribute(
                bench.model, clt, ids, max_features=args.graph_features, max_logits=5, progress=False
            )
            scores.append(graph.scores())
            lengths.append(path_length(graph))
        seconds = (time.perf_counter() - start) / len(prompts)
        replacement = sum(s.replacement for s in scores) / len(scores)
        completeness = sum(s.completeness for s in scores) / len(scores)
        length = sum(lengths) / len(lengths)
        print(f"{kind:<6} {replacement:>11.3f} {completeness:>12.3f} {length:>11.2f} {seconds:>8.1f}")
        print(f"graph_{kind}_replacement = {replacement:.3f}")
        print(f"graph_{kind}_completeness = {completeness:.3f}")
        print(f"graph_{kind}_path_length = {length:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/quality", help="Cache folder for the harvests and the runs.")
    parser.add_argument(
        "--buffer",
        help="An existing harvest folder to train on (skips the training harvest; sets the layers).",
    )
    parser.add_argument("--tokens", type=int, default=60_000, help="Training tokens to harvest.")
    parser.add_argument("--heldout-tokens", type=int, default=16_384, help="Eval-split tokens for dead %%.")
    parser.add_argument("--layers", default="0:12", help="Covered layers start:stop (half-open), or 'all'.")
    parser.add_argument("--features", type=int, default=256, help="Features per layer (both kinds).")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=6e-4, help="Peak learning rate (both kinds).")
    parser.add_argument("--clt-lambda", type=float, default=3e-4, help="λ of the first CLT run.")
    parser.add_argument(
        "--plt-lambda",
        type=float,
        default=5e-4,
        help="λ of the first PLT run (5e-4 matched 3e-4's CLT L0 here).",
    )
    parser.add_argument("--target-l0", type=float, help="Mean L0 to match (default: the first CLT run's).")
    parser.add_argument("--max-runs", type=int, default=3, help="Runs per kind at most.")
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="Relative L0 mismatch that is close enough."
    )
    parser.add_argument("--eval-sequences", type=int, default=32, help="Held-out sequences for CE / NMSE.")
    parser.add_argument(
        "--sweep", action="store_true", help="Also train each kind at half and twice its matched λ."
    )
    parser.add_argument(
        "--graphs", type=int, default=0, help="Also score attribution graphs on this many held-out prompts."
    )
    parser.add_argument(
        "--graph-tokens", type=int, default=16, help="Tokens per graph prompt (BOS included)."
    )
    parser.add_argument("--graph-features", type=int, default=500, help="max_features of each graph.")
    parser.add_argument("--quick", action="store_true", help="Smoke test: 4 layers, 64 features, 60 steps.")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.heldout_tokens, args.layers, args.features = 8192, 2048, "0:4", 64
        args.steps, args.batch, args.eval_sequences, args.max_runs = 60, 256, 8, 2
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every model load
    start = time.perf_counter()

    profile = cltlab.config.get_profile("default")
    out, layers = Path(args.out), parse_layers(args.layers)
    span = "all" if layers is None else f"{layers[0]}-{layers[1]}"
    harvest = dataclasses.replace(profile.harvest, layers=layers)
    if args.buffer:  # held-out text and evaluation follow its model, corpus and sequence length
        buffer = Path(args.buffer)
        info = cltlab.DiscBuffer(buffer).info
        harvest = dataclasses.replace(
            harvest, model=info["model"], corpus=info["corpus"], seq_len=info["seq_len"]
        )
    else:
        buffer = out / f"train_{harvest.model}_L{span}_{args.tokens}"
        cltlab.harvest(dataclasses.replace(harvest, n_tokens=args.tokens), buffer, progress=False)
    layer_start = cltlab.DiscBuffer(buffer).layer_start
    layer_stop = layer_start + cltlab.DiscBuffer(buffer).n_layers
    heldout = out / f"heldout_{harvest.model}_L{layer_start}-{layer_stop}_{args.heldout_tokens}"
    cltlab.harvest(
        dataclasses.replace(
            harvest, layers=(layer_start, layer_stop), n_tokens=args.heldout_tokens, split="eval"
        ),
        heldout,
        progress=False,
    )
    model = cltlab.load_model(harvest.model)  # float32 for evaluation, as notebook 04 does
    bench = Bench(args, harvest, buffer, heldout, model)
    print(f"{bench.buffer.summary()}\nheld out: {bench.heldout.n_tokens:,} tokens for dead %")
    print(
        f"{args.features} features per layer × {bench.buffer.n_layers} layers (model layers {layer_start}–"
        f"{layer_stop - 1}), {args.steps} steps × {args.batch} tokens; eval on {args.eval_sequences} held-out "
        f"sequences\n\nevery run:\n{HEADER}",
        flush=True,
    )

    runs: list[Run] = []
    target = bench.match("clt", args.clt_lambda, args.target_l0, runs)
    bench.match("plt", args.plt_lambda, target, runs)
    ratios = {}
    if args.sweep:  # each kind at half and twice its matched λ: a few points of the L0–quality frontier
        for kind in KINDS:
            lam = closest([r for r in runs if r.kind == kind], target).lam
            for factor in (0.5, 2.0):
                run = bench(kind, float(f"{lam * factor:.3g}"))
                runs.append(run)
                print(f"{row(kind, run.lam, run._asdict())}   ({run.train_s:.0f} s training)", flush=True)
        ratios = frontier(runs)

    print(f"\nat matched L0 (target {target:.1f}; closest run of each kind):\n{HEADER}")
    picked = {kind: closest([r for r in runs if r.kind == kind], target) for kind in KINDS}
    for kind, run in picked.items():
        print(row(kind, run.lam, run._asdict()))
    interpolated = {kind: interpolate([r for r in runs if r.kind == kind], target) for kind in KINDS}
    for kind, values in interpolated.items():
        if values is not None and picked[kind].l0 != target:
            print(row(f"{kind} interp.", "-", {**values, "l0": target}))

    clt, plt = picked["clt"], picked["plt"]
    print(f"\ntarget_l0 = {target:.2f}")
    for kind, run in picked.items():
        print(f"{kind}_lambda = {run.lam:.3g}")
        for name in METRICS:
            print(f"{kind}_{name} = {getattr(run, name):.4f}")
    print(f"nmse_plt/clt = {plt.nmse / clt.nmse:.3f}")
    print(f"ce_recovered_clt-plt = {clt.ce_recovered - plt.ce_recovered:.4f}")
    print(f"l0_plt/clt = {plt.l0 / clt.l0:.3f}")
    if interpolated["plt"] is not None:
        print(f"nmse_plt_interp/clt = {interpolated['plt']['nmse'] / clt.nmse:.3f}")
        print(f"ce_recovered_clt-plt_interp = {clt.ce_recovered - interpolated['plt']['ce_recovered']:.4f}")
    for l0, ratio in ratios.items():
        print(f"nmse_plt/clt@l0={l0:.0f} = {ratio:.3f}")
    if args.graphs:
        if layer_start != 0 or layer_stop != model.n_layers:
            raise SystemExit(
                "--graphs needs transcoders of every layer: pass --layers all (or a full --buffer)."
            )
        graph_scores(bench, picked, args)
    print(f"wall_s = {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
