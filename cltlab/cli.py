"""Command line for batch jobs: ``cltlab harvest | verify | train | evaluate | serve | run | dashboard`` and the
seed importers (``import-seed-activations``, ``import-seed-checkpoint``); also ``python -m cltlab``.

Every option defaults to the chosen profile's value: ``--profile NAME`` (ci, default, gpt2, gpu) or a YAML file written
by ``Profile.save``. The options are the fields of the config dataclasses in ``cltlab/config.py``, nested as they
are (``cltlab train --loss.sparsity_coef 1e-3 --trainer.max_steps 500``), with those fields' docstrings as help.
jsonargparse (LightningCLI's parser) reads them: ``--config FILE.yaml`` takes options from a file, and
``--print_config`` prints the options a command would run with, as such a file. Dashes and underscores are the
same in option names (``--shard-tokens`` is ``--shard_tokens``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from .config import PROFILES, EvalConfig, HarvestConfig, Profile, TrainConfig, get_profile
from .precision import resolve_device
from .run import RunPaths, run_paths

set_parsing_settings(docstring_parse_attribute_docstrings=True)  # a field's docstring is its option's help


@dataclasses.dataclass
class Command:
    """One subcommand: its help, its options beyond the common ones, and what it does."""

    help: str
    options: Callable[[ArgumentParser, Profile], None]
    run: Callable[[Parsed, RunPaths], int | None]
    """Does the work and returns the exit status, or None for a process with nothing to report (exit 0)."""
    config: type | None = None
    """The config dataclass whose fields are among the options (built by ``parse``)."""
    description: str | None = None


class Parsed(NamedTuple):
    """A command line, read."""

    command: str
    options: Namespace
    """All the command's options."""
    config: Any
    """The command's config dataclass built from them (``HarvestConfig``, ``TrainConfig``, ``EvalConfig``), or None."""
    profile: Profile
    verbose: bool


def config_from(cls: type, args: Namespace):
    """The ``cls`` whose fields ``args`` holds at its top level (its nested parts already built by jsonargparse)."""
    return cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})


def harvest_folder(parser: ArgumentParser, name: str, verb: str) -> None:
    """The option (or optional positional) naming the harvest folder a command reads or writes."""
    positional = {} if name.startswith("-") else {"nargs": "?"}
    parser.add_argument(name, **positional, help=f"Harvest folder to {verb} (null: <run_dir>/activations).")


def harvest_options(parser: ArgumentParser, profile: Profile) -> None:
    harvest_folder(parser, "--out", "write")
    parser.add_argument(
        "--job", default="0/1", type=job_spec, metavar="I/N",
        help="Write only shards I, I+N, I+2N, ... so N jobs (e.g. a SLURM array) fill one folder together.",
    )  # fmt: skip
    device_option(parser)
    parser.add_class_arguments(HarvestConfig, None, default=profile.harvest)


def device_option(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto",
        help="Where models and CLTs run: auto (the GPU when there is one), cpu, cuda or cuda:N.",
    )  # fmt: skip


def job_spec(text: str) -> str:
    """``text`` if it is ``"I/N"`` with 0 ≤ I < N (the job's shards: I, I+N, I+2N, ...)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--job must be I/N with 0 <= I < N, such as 0/4, not {text!r}.")
    return text.strip()


def run_harvest(args: Parsed, paths: RunPaths) -> int:
    from .harvest import harvest

    job = tuple(int(part) for part in args.options.job.split("/"))
    result = harvest(args.config, args.options.out or paths.buffer, job=job, device=args.options.device)
    state = "complete" if result.complete else "waiting for the other jobs' shards"
    print(f"{result.n_tokens} tokens in {result.path} ({state}; {result.seconds:.0f} s)")
    return 0


def verify_options(parser: ArgumentParser, profile: Profile) -> None:
    harvest_folder(parser, "folder", "check")


def run_verify(args: Parsed, paths: RunPaths) -> int:
    from .store import verify

    folder = args.options.folder or paths.buffer
    found = verify(folder)
    for problem in found.problems:
        print(problem)
    if found.problems:
        print(
            f"{folder}: {len(found.problems)} damaged (of {found.n_batches} batches in {found.n_shards} shards)."
        )
        return 1
    print(f"{folder}: {found.n_shards} shards, {found.n_batches} batches, every checksum matches.")
    return 0


def train_options(parser: ArgumentParser, profile: Profile) -> None:
    harvest_folder(parser, "--buffer", "train on")
    parser.add_argument(
        "--resume", action="store_true", help="Continue from <run_dir>/checkpoints/last.ckpt."
    )
    parser.add_class_arguments(TrainConfig, None, default=profile.train)


def run_train(args: Parsed, paths: RunPaths) -> int | None:
    from .training import train

    # Under torchrun or SLURM every process runs this; each trains on its own part of the buffer.
    options = args.options
    result = train(args.config, options.buffer or paths.buffer, paths.root, resume=options.resume)
    if result.rank != 0:
        return None  # rank 0 alone reports
    print(f"saved the CLT to {result.clt_dir}; metrics in {result.log_dir}")
    return 0


def evaluate_options(parser: ArgumentParser, profile: Profile) -> None:
    parser.add_argument("--clt", help="Saved CLT folder (null: <run_dir>/clt).")
    parser.add_argument("--model", help="Model to evaluate on (null: the profile's harvest model).")
    parser.add_argument("--corpus", help="Corpus whose eval split is used (null: the profile's).")
    device_option(parser)
    parser.add_class_arguments(EvalConfig, None, default=profile.eval)


def run_evaluate(args: Parsed, paths: RunPaths) -> int:
    from .clt import CrossLayerTranscoder
    from .models import load_model
    from .replacement import evaluate

    options, harvested = args.options, args.profile.harvest
    clt = CrossLayerTranscoder.load(options.clt or paths.clt, device=options.device)
    model = load_model(options.model or harvested.model, dtype="float32", device=options.device)
    corpus, seq_len = options.corpus or harvested.corpus, harvested.seq_len
    metrics = evaluate(model, clt, corpus=corpus, seq_len=seq_len, config=args.config)
    print(metrics.summary())
    print(f"metrics written to {paths.save_metrics(metrics)}")
    return 0


def serve_options(parser: ArgumentParser, profile: Profile) -> None:
    harvest_folder(parser, "--buffer", "serve")
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to bind; anything but loopback needs --token."
    )
    parser.add_argument("--port", type=int, default=8765, help="Port to listen on (0: any free port).")
    parser.add_argument("--token", help="Bearer token clients must send (null: $CLTLAB_TOKEN).")
    parser.add_argument("--seconds", type=float, help="Stop after this many seconds (null: until Ctrl-C).")
    parser.add_argument(
        "--live", action="store_true",
        help="Live mode: run the profile's harvest model on its corpus now and serve its rows (no folder).",
    )  # fmt: skip
    parser.add_argument(
        "--shuffle_rows",
        type=int,
        default=65536,
        help="Live mode: pool of rows each batch mixes (0: in order).",
    )
    device_option(parser)


def run_serve(args: Parsed, paths: RunPaths) -> int:
    options = args.options
    from .server import serve

    token = options.token or os.environ.get("CLTLAB_TOKEN")
    if options.live:
        from .models import load_model
        from .precision import model_dtype

        live = args.profile.harvest
        model = load_model(
            live.model, dtype=model_dtype(live.model_dtype, options.device), device=options.device
        )
        from .server import LiveSource

        source = LiveSource.from_config(model, live, shuffle_rows=options.shuffle_rows)
        handle = serve(source, options.host, options.port, token=token)
    else:
        handle = serve(options.buffer or paths.buffer, options.host, options.port, token=token)
    print(f"serving {handle.source.info.description} at {handle.url} (Ctrl-C stops)", flush=True)
    stop_at = time.monotonic() + (options.seconds if options.seconds is not None else float("inf"))
    try:
        while handle.running and time.monotonic() < stop_at:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
    return 0


def run_run(args: Parsed, paths: RunPaths) -> int:
    from .run import run_notebooks

    run_notebooks(args.options.profile, paths.root, device=args.options.device)
    print(f"\n=== cltlab main job: profile {args.profile.name}, run folder {paths.root} ===")
    print(paths.load_metrics().summary())
    print(paths.load_attribution_scores().summary())
    print(f"report: {paths.report}  (executed notebooks + HTML)")
    return run_dashboard(args, paths)


def dashboard_options(parser: ArgumentParser, profile: Profile) -> None:
    parser.add_argument("--out", help="Folder to write the site into (null: <run_dir>/dashboard).")
    device_option(parser)


def run_dashboard(args: Parsed, paths: RunPaths) -> int:
    from .run import write_dashboard

    out, device = getattr(args.options, "out", None), args.options.device
    print(f"feature dashboard: {write_dashboard(args.profile, paths, out=out, device=device)}  (offline)")
    return 0


def seed_activation_options(parser: ArgumentParser, profile: Profile) -> None:
    parser.add_argument(
        "file", help="The seed's activation file (HDF5, dataset 'tensor' (N, 2, n_layers, d_model))."
    )
    parser.add_argument("out", help="DiscBuffer folder to write (an interrupted import resumes).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_rows", type=int, default=4096, help="Rows read and committed at a time.")


def run_import_seed_activations(args: Parsed, paths: RunPaths) -> int:
    from .buffer import DiscBuffer
    from .seed import import_seed_activations

    options = args.options
    out = import_seed_activations(
        options.file, options.out, dtype=options.dtype, batch_rows=options.batch_rows
    )
    print(DiscBuffer(out, batch_size=1).summary())
    return 0


def seed_checkpoint_options(parser: ArgumentParser, profile: Profile) -> None:
    parser.add_argument("checkpoint", help="A seed Lightning checkpoint (or state dict) of a JumpReLU CLT.")
    parser.add_argument("out", help="Folder to save the cltlab CLT in.")


def run_import_seed_checkpoint(args: Parsed, paths: RunPaths) -> int:
    from .seed import import_seed_checkpoint

    clt = import_seed_checkpoint(args.options.checkpoint, args.options.out)
    config = clt.config
    print(
        f"saved {args.options.out}: {config.n_layers} layers × {config.d_features} features, d_model {config.d_model}"
    )
    return 0


COMMANDS = {
    "harvest": Command(
        "Harvest resid_mid/mlp_out activations into an HDF5 DiscBuffer.",
        harvest_options,
        run_harvest,
        HarvestConfig,
    ),
    "verify": Command(
        "Check every batch of a harvest folder against the checksums recorded when it was written.",
        verify_options,
        run_verify,
    ),
    "train": Command(
        "Train a CLT (or per-layer transcoder) on a harvested buffer.",
        train_options,
        run_train,
        TrainConfig,
        "Train a CLT on a harvested buffer. On N GPUs: --trainer.devices N --trainer.strategy ddp (or fsdp); under "
        "torchrun or SLURM (srun) start one process per GPU and pass the same --trainer.devices/--trainer.num_nodes.",
    ),
    "evaluate": Command(
        "Measure the replacement model: CE recovered, KL, top-1, NMSE, L0.",
        evaluate_options,
        run_evaluate,
        EvalConfig,
    ),
    "serve": Command(
        "Serve a harvest folder to ActivationClients over HTTP and shared memory.", serve_options, run_serve
    ),
    "run": Command(
        "The main job: execute notebooks 01-04 and 06 headlessly; keep them as the report.",
        lambda parser, profile: device_option(parser),
        run_run,
    ),
    "dashboard": Command(
        "Write the static feature dashboard (index by layer, a page per feature) that opens offline.",
        dashboard_options,
        run_dashboard,
    ),
    "import-seed-activations": Command(
        "Convert a crosslayer-transcoder (seed) activation file into a DiscBuffer folder.",
        seed_activation_options,
        run_import_seed_activations,
    ),
    "import-seed-checkpoint": Command(
        "Convert a crosslayer-transcoder (seed) JumpReLU CLT checkpoint into a cltlab CLT.",
        seed_checkpoint_options,
        run_import_seed_checkpoint,
    ),
}


def build_parser(profile: Profile) -> ArgumentParser:
    """The whole command line, every option defaulting to ``profile``'s value."""
    parser = ArgumentParser(prog="cltlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress messages.")
    subcommands = parser.add_subcommands(dest="command")
    for name, command in COMMANDS.items():
        sub = ArgumentParser(description=command.description or command.help)
        sub.add_argument(
            "--profile",
            default="default",
            help=f"Profile giving every default: {', '.join(sorted(PROFILES))} (ci: tiny-gpt2 in seconds; "
            "default: smollm2-135m) or a YAML file saved by Profile.save.",
        )
        sub.add_argument("--run_dir", help="Run folder for all artifacts (null: runs/<profile>).")
        sub.add_argument(
            "--config", action=ActionConfigFile, help="YAML file of options (see --print_config)."
        )
        command.options(sub, profile)
        subcommands.add_subcommand(name, sub, help=command.help)
    return parser


def underscored(argv: list[str]) -> list[str]:
    """``--shard-tokens=5`` → ``--shard_tokens=5``: option names may be written with dashes as well."""
    return [re.sub(r"^--[^=]+", lambda name: name[0][:2] + name[0][2:].replace("-", "_"), a) for a in argv]


def parse(argv: list[str]) -> Parsed:
    """Read a command line; a wrong one exits with status 2 and one message naming what was wrong."""
    argv = underscored(argv)
    # The profile decides every other option's default, so it is read first, wherever it stands.
    first = argparse.ArgumentParser(prog="cltlab", add_help=False)
    first.add_argument("--profile", default="default")
    name = first.parse_known_args(argv)[0].profile
    while True:  # twice when a --config file names another profile: then its defaults are that profile's
        try:
            profile = get_profile(name)
        except (
            KeyError,
            OSError,
            ValueError,
        ) as error:  # an unknown name, an unreadable or invalid YAML file
            first.error(str(error).strip("'\""))
        parser = build_parser(profile)
        args = parser.parse_args(argv)
        if args[args.command].profile == name:
            break
        name = args[args.command].profile
    cls = COMMANDS[args.command].config
    try:
        options = parser.instantiate(args)[args.command]
        config = config_from(cls, options) if cls else None
        if getattr(options, "device", None) is not None:
            resolve_device(options.device)  # one that this machine lacks is refused here, not mid-run
    except ValueError as error:  # a value the config dataclass refuses (its __post_init__)
        parser.error(f"{args.command}: {error}")
    return Parsed(args.command, options, config, profile, args.verbose)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("cltlab").setLevel(logging.INFO)
    start = time.perf_counter()
    code = COMMANDS[args.command].run(args, run_paths(args.options.profile, args.options.run_dir))
    if code is None:
        return 0
    print(f"[{args.command} took {time.perf_counter() - start:.0f} s]")
    return code


if __name__ == "__main__":
    sys.exit(main())
