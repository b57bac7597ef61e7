"""Command line for batch jobs: ``cltlab harvest | verify | train | evaluate | serve | run`` (also ``python -m cltlab``).

Every option of a stage defaults to the chosen profile's value; the options are the fields of the config
dataclasses in ``cltlab/config.py`` and their help is those fields' docstrings.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
import time

from .config import PROFILES, EvalConfig, HarvestConfig, TrainConfig, get_profile


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _parse_value(text: str, default, annotation: str = ""):
    if annotation == "int | str":  # e.g. devices: a count, or "auto", or a list such as "0,1"
        return int(text) if text.isdigit() else text
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(float(text))
    if isinstance(default, float):
        return float(text)
    if isinstance(default, tuple) or default is None:
        return tuple(int(v) for v in text.replace(":", ",").split(",")) if text.lower() != "none" else None
    return text


def add_config_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(
        title, f"(defaults come from --profile; see cltlab/config.py:{cls.__name__})"
    )
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"{cls.__name__}.{f.name}",
            metavar="VALUE",
            help=docs.get(f.name, "").replace("%", "%%"),
        )


def apply_options(config, args: argparse.Namespace):
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(args, f"{type(config).__name__}.{f.name}", None)
        if value is not None:
            changes[f.name] = _parse_value(value, getattr(config, f.name), str(f.type))
    return dataclasses.replace(config, **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cltlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress messages.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--profile",
            default="default",
            choices=sorted(PROFILES),
            help="Named profile giving every default (ci: tiny-gpt2 in seconds; default: smollm2-135m).",
        )
        p.add_argument("--run-dir", help="Run folder for all artifacts (default: runs/<profile>).")

    p = sub.add_parser("harvest", help="Harvest resid_mid/mlp_out activations into an HDF5 DiscBuffer.")
    common(p)
    p.add_argument("--out", help="Harvest folder to write (default: <run-dir>/activations).")
    p.add_argument(
        "--job", default="0/1", metavar="I/N",
        help="Write only shards I, I+N, I+2N, ... so N jobs (e.g. a SLURM array) fill one folder together.",
    )  # fmt: skip
    add_config_options(p, HarvestConfig, "harvest options")

    p = sub.add_parser(
        "verify",
        help="Check every batch of a harvest folder against the checksums recorded when it was written.",
    )
    common(p)
    p.add_argument("folder", nargs="?", help="Harvest folder to check (default: <run-dir>/activations).")

    p = sub.add_parser(
        "train",
        help="Train a CLT (or per-layer transcoder) on a harvested buffer.",
        description="Train a CLT on a harvested buffer. On N GPUs: --devices N --strategy ddp (or fsdp); "
        "under torchrun or SLURM (srun) start one process per GPU and pass the same --devices/--num-nodes.",
    )
    common(p)
    p.add_argument("--buffer", help="Harvest folder to train on (default: <run-dir>/activations).")
    p.add_argument("--resume", action="store_true", help="Continue from <run-dir>/checkpoints/last.ckpt.")
    add_config_options(p, TrainConfig, "training options")

    p = sub.add_parser("evaluate", help="Measure the replacement model: CE recovered, KL, top-1, NMSE, L0.")
    common(p)
    p.add_argument("--clt", help="Saved CLT folder (default: <run-dir>/clt).")
    p.add_argument("--model", help="Model to evaluate on (default: the profile's harvest model).")
    p.add_argument("--corpus", help="Corpus whose eval split is used (default: the profile's).")
    add_config_options(p, EvalConfig, "evaluation options")

    p = sub.add_parser(
        "serve", help="Serve a harvest folder to ActivationClients over HTTP and shared memory."
    )
    common(p)
    p.add_argument("--buffer", help="Harvest folder to serve (default: <run-dir>/activations).")
    p.add_argument(
        "--host", default="127.0.0.1", help="Address to bind; anything but loopback needs --token."
    )
    p.add_argument("--port", type=int, default=8765, help="Port to listen on (0: any free port).")
    p.add_argument("--token", help="Bearer token clients must send (default: $CLTLAB_TOKEN).")
    p.add_argument("--seconds", type=float, help="Stop after this many seconds (default: until Ctrl-C).")

    p = sub.add_parser(
        "run", help="The main job: execute notebooks 01-04 and 06 headlessly; keep them as the report."
    )
    common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("cltlab").setLevel(logging.INFO)
    from .run import run_paths

    profile = get_profile(args.profile)
    paths = run_paths(args.profile, args.run_dir)
    start = time.perf_counter()
    if args.command == "harvest":
        from .harvest import harvest

        config = apply_options(profile.harvest, args)
        job = tuple(int(v) for v in args.job.split("/"))
        result = harvest(config, args.out or paths.buffer, job=job)
        state = "complete" if result.complete else "waiting for the other jobs' shards"
        print(f"{result.n_tokens} tokens in {result.path} ({state}; {result.seconds:.0f} s)")
    elif args.command == "verify":
        from .store import verify

        folder = args.folder or paths.buffer
        found = verify(folder)
        for problem in found.problems:
            print(problem)
        if found.problems:
            print(
                f"{folder}: {len(found.problems)} damaged (of {found.n_batches} batches in {found.n_shards} shards)."
            )
            return 1
        print(f"{folder}: {found.n_shards} shards, {found.n_batches} batches, every checksum matches.")
    elif args.command == "train":
        from .train import train

        # Under torchrun or SLURM every process runs this; each trains on its own part of the buffer.
        result = train(
            apply_options(profile.train, args), args.buffer or paths.buffer, paths.root, resume=args.resume
        )
        if result.rank != 0:
            return 0
        print(f"saved the CLT to {result.clt_dir}; metrics in {result.log_dir}")
    elif args.command == "evaluate":
        from .clt import CrossLayerTranscoder
        from .models import load_model
        from .replacement import evaluate

        clt = CrossLayerTranscoder.load(args.clt or paths.clt)
        model = load_model(args.model or profile.harvest.model, dtype="float32")
        metrics = evaluate(
            model,
            clt,
            corpus=args.corpus or profile.harvest.corpus,
            seq_len=profile.harvest.seq_len,
            config=apply_options(profile.eval, args),
        )
        print(metrics.summary())
        print(f"metrics written to {paths.save_metrics(metrics)}")
    elif args.command == "serve":
        import os

        from .server import serve

        handle = serve(
            args.buffer or paths.buffer,
            args.host,
            args.port,
            token=args.token or os.environ.get("CLTLAB_TOKEN"),
        )
        print(f"serving {handle.source.info.description} at {handle.url} (Ctrl-C stops)", flush=True)
        try:
            while handle.running and (args.seconds is None or time.perf_counter() - start < args.seconds):
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            handle.stop()
    elif args.command == "run":
        from .run import run_notebooks

        run_notebooks(args.profile, paths.root)
        print(f"\n=== cltlab main job: profile {args.profile}, run folder {paths.root} ===")
        print(paths.load_metrics().summary())
        print(paths.load_attribution_scores().summary())
        print(f"report: {paths.report}  (executed notebooks + HTML)")
    print(f"[{args.command} took {time.perf_counter() - start:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
