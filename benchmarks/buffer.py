"""buffer/fromfile: DiscBuffer shuffled-batch GB/s ÷ sequential np.fromfile GB/s over the same shard file.

A one-shard harvest folder shaped like smollm2-135m (30 layers × d_model 576, bfloat16) is filled with random
data, read once to warm the page cache, then read whole by np.fromfile and as one DiscBuffer epoch of shuffled
batches, best of three each, side by side in this run.
Usage: python benchmarks/buffer.py [--rows 16384] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cltlab import DiscBuffer
from cltlab.shard_writer import create_shard
from cltlab.store import FORMAT, FORMAT_VERSION, shard_name, write_manifest


def make_folder(folder: Path, rows: int, n_layers: int, d_model: int) -> Path:
    provenance = dict(
        format=FORMAT, format_version=FORMAT_VERSION, model="synthetic", corpus="random", split="train",
        sites=json.dumps(["resid_mid", "mlp_out"]), layer_start=0, layer_stop=n_layers, d_model=d_model,
        dtype="bfloat16", seq_len=129, batch_size=rows // 128, n_tokens=rows, shard_batches=1,
        tokenizer="none", bos_token_id=0, config="{}", cltlab_version="bench",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    with create_shard(folder / shard_name(0), provenance, index=0, first_batch=0, n_rows=rows,
                      n_sequences=provenance["batch_size"]) as f:  # fmt: skip
        step = 1024
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            for site in ("resid_mid", "mlp_out"):
                f[site][start:stop] = rng.integers(
                    0, 2**16, (stop - start, n_layers, d_model), dtype=np.uint16
                )
        f["progress"][...] = (rows, 1)
        f["stats_rows"][...] = rows  # zero sums: mean 0, a tiny scale (the timings do not use them)
    write_manifest(folder, provenance, 1)
    return folder / shard_name(0)


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def shape_arguments(description: str) -> argparse.Namespace:
    """The synthetic folder's shape from the command line (shared with benchmarks/server.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    return parser.parse_args()


def main() -> None:
    args = shape_arguments(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        shard = make_folder(Path(tmp), args.rows, args.layers, args.d_model)
        size = shard.stat().st_size
        np.fromfile(shard, dtype=np.uint8)  # warm the page cache
        fromfile = size / best_of(3, lambda: np.fromfile(shard, dtype=np.uint8)) / 1e9
        buffer = DiscBuffer(tmp, batch_size=args.batch_size)
        payload = buffer.n_tokens * 2 * args.layers * args.d_model * 2  # both sites, 2 bytes per value

        def epoch() -> None:
            for i in range(len(buffer)):
                buffer[i]

        epoch()
        disc = payload / best_of(3, epoch) / 1e9
        print(
            f"file {size / 2**30:.2f} GiB, {len(buffer)} batches of {args.batch_size} rows, block {buffer.block_rows} rows"
        )
        print(f"np.fromfile {fromfile:.2f} GB/s, DiscBuffer shuffled batches {disc:.2f} GB/s")
        print(f"buffer/fromfile = {disc / fromfile:.2f}")


if __name__ == "__main__":
    main()
