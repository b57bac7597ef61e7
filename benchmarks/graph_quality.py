"""The paper's second result on the default run: attribution graphs of the CLT vs a per-layer transcoder (PLT).

Takes a finished ``make run`` folder (its harvest and its CLT), trains a PLT on the same harvest with the same
training settings but ``cross_layer=False`` and its own sparsity λ (``--plt-lambda``; 5e-4 matched the CLT's L0 at
3e-4 in ``quality.py``), reports both kinds' held-out L0 / NMSE / CE recovered, then builds the attribution graph
of each on the same ``--prompts`` held-out prompts and prints the mean replacement score, completeness score and
influence-weighted path length (``quality.path_length``). Cheaper than ``quality.py --graphs`` (which also
searches λ to match L0 and trains its own CLT). The PLT is cached under ``--out``.
Usage: python benchmarks/graph_quality.py [--run runs/default] [--prompts 10] [--plt-lambda 5e-4]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import transformers
from quality import Run, graph_scores

import cltlab


class _Bench:
    """What ``quality.graph_scores`` reads: the harvest settings, the model and where each kind's CLT lives."""

    def __init__(self, harvest, model, dirs: dict[str, Path]):
        self.harvest, self.model, self.dirs = harvest, model, dirs

    def run_dir(self, kind: str, lam: float) -> Path:
        return self.dirs[kind]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--plt-lambda", type=float, default=5e-4)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--graph-tokens", type=int, default=16)
    parser.add_argument("--graph-features", type=int, default=500)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    paths = cltlab.run.run_paths("default", args.run)
    profile = cltlab.config.get_profile("default")
    plt_dir = args.out / f"plt_default_lam{args.plt_lambda:.3g}"
    if not (plt_dir / "clt" / "config.json").exists():
        config = profile.train.replace(
            cross_layer=False, sparsity_coef=args.plt_lambda, wandb=False, num_workers=0
        )
        cltlab.train(config, paths.buffer, plt_dir, enable_progress_bar=False)
    plt = cltlab.CrossLayerTranscoder.load(plt_dir / "clt")
    clt = cltlab.CrossLayerTranscoder.load(paths.clt)
    model = cltlab.load_model(profile.harvest.model)
    print(f"{'model':<6} {'mean L0':>8} {'NMSE':>7} {'CE rec.':>8} {'KL':>7}")
    for kind, transcoder in (("clt", clt), ("plt", plt)):
        m = cltlab.evaluate(
            model, transcoder, corpus=profile.harvest.corpus, seq_len=profile.harvest.seq_len,
            config=profile.eval, progress=False,
        )  # fmt: skip
        print(
            f"{kind:<6} {m.mean_l0:>8.1f} {sum(m.nmse) / len(m.nmse):>7.4f} {m.ce_recovered:>8.4f} {m.kl:>7.4f}"
        )
        print(f"{kind}_l0 = {m.mean_l0:.1f}")
    bench = _Bench(profile.harvest, model, {"clt": paths.root, "plt": plt_dir})
    runs = {kind: Run(kind, 0.0, 0, 0, 0, 0, 0, 0, 0) for kind in ("clt", "plt")}
    graph_args = argparse.Namespace(
        graphs=args.prompts, graph_tokens=args.graph_tokens, graph_features=args.graph_features
    )
    graph_scores(bench, runs, graph_args)
    print(f"wall_s = {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
