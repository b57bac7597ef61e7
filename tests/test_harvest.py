"""Harvest: what nnsight stores equals plain PyTorch hooks; the folder layout; reuse, refusal, jobs, and resuming
after a SIGKILL with exactly the rows of an uninterrupted run."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import BUFFER_CONFIG, BUFFER_SHARD_ROWS
from helpers import hooked_sites, random_ids

from cltlab import DiscBuffer, harvest
from cltlab.config import HarvestConfig
from cltlab.corpus import token_sequences
from cltlab.locks import HarvestBusy
from cltlab.models import LoadedModel
from cltlab.shard_writer import STATS_STRIDE
from cltlab.sites import trace_sites
from cltlab.store import open_shard


def harvested_sequences(model: LoadedModel, config: HarvestConfig, n_sequences: int) -> torch.Tensor:
    """The first ``n_sequences`` sequences the harvest reads, rebuilt from the corpus."""
    batches = token_sequences(
        config.corpus,
        model.tokenizer,
        seq_len=config.seq_len,
        bos_token_id=model.bos_token_id,
        split=config.split,
        batch_size=config.batch_size,
    )
    n_batches = -(-n_sequences // config.batch_size)
    return torch.cat(list(itertools.islice(batches, n_batches)))[:n_sequences]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def plain(value):
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def differing_keys(a: dict, b: dict) -> list[str]:
    return [key for key in sorted(set(a) | set(b)) if plain(a.get(key)) != plain(b.get(key))]


def differences(folder: Path, reference: Path) -> list[str]:
    """Where two harvest folders differ: file names, manifest, and every attribute and dataset of every shard."""
    names, expected = sorted(p.name for p in folder.iterdir()), sorted(p.name for p in reference.iterdir())
    if names != expected:
        return [f"files {names} != {expected}"]
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (folder, reference)]
    out = [f"manifest[{key!r}]" for key in differing_keys(*manifests)]
    for name in names:
        if not name.endswith(".h5"):
            continue
        with h5py.File(folder / name, "r") as a, h5py.File(reference / name, "r") as b:
            out += [f"{name} attrs[{key!r}]" for key in differing_keys(dict(a.attrs), dict(b.attrs))]
            for key in sorted(set(a) | set(b)):
                x, y = (a[key][()] if key in a else None), (b[key][()] if key in b else None)
                if (
                    x is None
                    or y is None
                    or x.dtype != y.dtype
                    or x.shape != y.shape
                    or not np.array_equal(x, y)
                ):
                    out.append(f"{name}:{key}")
    return out


def batches_on_disk(folder: Path) -> int:
    """Forward batches that the shards of a folder (finished or partial) vouch for with their ``progress``."""
    done = 0
    for path in folder.glob("shard-*.h5*"):
        try:
            with open_shard(path) as f:
                done += int(f["progress"][1])
        except ValueError:  # a partial shard killed before its creation reached the disk: started again
            pass
    return done


def finished_shards(folder: Path) -> dict[str, tuple[int, int]]:
    """Inode and modification time of each finished shard: unchanged unless the file was written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*.h5")}


@pytest.fixture
def count_forwards(monkeypatch) -> list[int]:
    """Counts the forward batches ``harvest`` runs (one ``trace_layers`` call each)."""
    calls = []
    # The module, not the ``harvest`` function that cltlab/__init__ exports under the same name.
    module = importlib.import_module("cltlab.harvest")
    trace = module.trace_layers

    def counting(model, ids, *args, **kwargs):
        calls.append(len(ids))
        return trace(model, ids, *args, **kwargs)

    monkeypatch.setattr(module, "trace_layers", counting)
    return calls


# ------------------------------------------------------------------------------------------------ what is stored


def test_folder_layout_and_provenance(buffer_path, tiny_gpt2):
    manifest = json.loads((buffer_path / "manifest.json").read_text())
    assert manifest["format"] == "cltlab.activations" and manifest["format_version"] == 3
    assert (manifest["model"], manifest["corpus"], manifest["split"]) == ("tiny-gpt2", "shakespeare", "train")
    assert (manifest["layer_start"], manifest["layer_stop"], manifest["d_model"]) == (0, 4, 64)
    assert (manifest["seq_len"], manifest["batch_size"], manifest["dtype"]) == (32, 4, "float32")
    assert manifest["bos_token_id"] == tiny_gpt2.bos_token_id
    assert json.loads(manifest["sites"]) == ["resid_mid", "mlp_out"]
    assert manifest["n_written"] == manifest["n_tokens"] == 500 and manifest["complete"] is True
    assert (manifest["n_shards"], manifest["shard_batches"]) == (3, 2)
    assert manifest["shards"] == [
        {"file": "shard-00000.h5", "n_rows": 248, "first_sequence": 0},
        {"file": "shard-00001.h5", "n_rows": 248, "first_sequence": 8},
        {"file": "shard-00002.h5", "n_rows": 4, "first_sequence": 16},
    ]
    for index, (rows, batches) in enumerate(zip(BUFFER_SHARD_ROWS, [2, 2, 1], strict=True)):
        with h5py.File(buffer_path / f"shard-{index:05d}.h5", "r") as f:
            attrs = dict(f.attrs)
            assert (attrs["shard_index"], attrs["first_batch"], attrs["n_rows"]) == (index, 2 * index, rows)
            assert attrs["model"] == "tiny-gpt2" and attrs["format_version"] == 3
            assert f["resid_mid"].shape == f["mlp_out"].shape == (rows, 4, 64)
            assert f["resid_mid"].dtype == f["mlp_out"].dtype == np.float32
            assert f["tokens"].shape == f["sequence"].shape == f["position"].shape == (rows,)
            assert f["sequences"].shape == (4 * batches, 32)
            assert tuple(f["progress"][()]) == (rows, batches)
            positions = f["position"][()]
            # BOS (position 0) is never stored.
            assert positions.min() >= 1 and positions.max() <= 31


def test_harvest_equals_plain_forward_hooks(buffer_path, harvest_config, tiny_gpt2):
    buffer = DiscBuffer(buffer_path, batch_size=100)
    rows = buffer.read(0, 500)
    tokens, sequence, position = buffer.token_info()
    ids = harvested_sequences(tiny_gpt2, harvest_config, int(sequence.max()) + 1)
    hooked_resid, hooked_mlp = hooked_sites(tiny_gpt2, ids, range(4))  # (n_sequences, 32, 4, 64)
    assert np.array_equal(tokens, ids[sequence, position].numpy())
    assert torch.equal(rows.resid_mid, hooked_resid[sequence, position])
    assert torch.equal(rows.mlp_out, hooked_mlp[sequence, position])
    # Each (sequence, position) is stored at most once.
    assert len(set(zip(sequence.tolist(), position.tolist(), strict=True))) == 500


def test_rows_point_into_their_shards_sequences(buffer_path):
    """Every row's ``sequence`` names a row of its own shard's ``sequences``, with the row's token there."""
    for shard in sorted(buffer_path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            tokens, sequence, position = f["tokens"][()], f["sequence"][()], f["position"][()]
            sequences, first = f["sequences"][()], int(f.attrs["first_sequence"])
        local = sequence - first
        assert local.min() >= 0 and local.max() < len(sequences), shard.name
        assert np.array_equal(sequences[local, position], tokens), shard.name


def test_stored_sequences_are_the_harvested_ones(buffer_path, harvest_config, tiny_gpt2):
    sequences = DiscBuffer(buffer_path, batch_size=100).sequences
    assert sequences.shape == (20, 32)
    ids = harvested_sequences(tiny_gpt2, harvest_config, len(sequences))
    assert np.array_equal(sequences, ids.numpy())
    assert (sequences[:, 0] == tiny_gpt2.bos_token_id).all()


def test_rows_are_shuffled_within_forward_batches(buffer_path):
    _, sequence, position = DiscBuffer(buffer_path, batch_size=100).token_info()
    file_order = sequence * 32 + position
    assert not np.array_equal(file_order, np.sort(file_order))
    # ...but only within a forward batch of 4 sequences (124 rows); the 5th batch keeps 4 of its rows.
    for batch in range(5):
        rows = slice(124 * batch, min(124 * (batch + 1), 500))
        assert set(sequence[rows].tolist()) <= set(range(4 * batch, 4 * batch + 4)), batch
    assert set(sequence[:124].tolist()) == {0, 1, 2, 3}


def test_shard_statistics_are_the_sums_over_every_eighth_row(buffer_path):
    for shard in sorted(buffer_path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            assert f["stats_rows"][()] == len(range(0, f.attrs["n_rows"], STATS_STRIDE))
            for s, site in enumerate(["resid_mid", "mlp_out"]):
                rows = f[site][::STATS_STRIDE].astype(np.float64)  # (n_rows / 8, n_layers, d_model)
                # Summed in float32 within a forward batch, so equal to float32 precision.
                assert np.allclose(f["stats_sum"][s], rows.sum(0), rtol=1e-5, atol=1e-5), (shard.name, site)
                assert np.allclose(f["stats_sq"][s], (rows**2).sum((0, 2)), rtol=1e-5), (shard.name, site)


def test_trace_sites_equals_hooks_on_llama(tiny_llama):
    ids = random_ids(tiny_llama, 3, 12)
    acts = trace_sites(tiny_llama, ids, 0, 3)
    resid, mlp = hooked_sites(tiny_llama, ids, range(3))
    assert acts.resid_mid.shape == acts.mlp_out.shape == (3, 12, 3, 32)
    assert torch.equal(acts.resid_mid, resid)
    assert torch.equal(acts.mlp_out, mlp)


def test_trace_sites_layer_range_on_gpt2(tiny_gpt2):
    ids = random_ids(tiny_gpt2, 2, 10)
    acts = trace_sites(tiny_gpt2, ids, 1, 3)
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(1, 3))
    assert acts.resid_mid.shape == (2, 10, 2, 64)
    assert torch.equal(acts.resid_mid, resid) and torch.equal(acts.mlp_out, mlp)


def test_layer_sub_range_harvest(tmp_path, buffer_path, harvest_config, tiny_gpt2):
    config = HarvestConfig(**{**vars(harvest_config), "layers": (1, 3)})
    result = harvest(config, tmp_path / "sub", model=tiny_gpt2, progress=False)
    buffer = DiscBuffer(result.path, batch_size=100)
    assert (buffer.layer_start, buffer.n_layers, buffer.d_model, buffer.n_tokens) == (1, 2, 64, 500)
    full = DiscBuffer(buffer_path, batch_size=100)
    # Same corpus, same shuffle: the same rows, restricted to layers 1 and 2.
    assert np.array_equal(buffer.token_info()[1], full.token_info()[1])
    sub, whole = buffer.read(0, 500), full.read(0, 500)
    assert torch.equal(sub.resid_mid, whole.resid_mid[:, 1:3])
    assert torch.equal(sub.mlp_out, whole.mlp_out[:, 1:3])
    for a, b in zip(buffer.stats, full.stats, strict=True):
        assert torch.allclose(a, b[1:3], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_storage_round_trips(tmp_path, tiny_gpt2, dtype):
    config = HarvestConfig(
        model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=1, dtype=dtype, shard_tokens=31
    )
    result = harvest(config, tmp_path / dtype, model=tiny_gpt2, progress=False)
    assert len(json.loads((result.path / "manifest.json").read_text())["shards"]) == 2
    with h5py.File(result.path / "shard-00000.h5", "r") as f:
        assert f["resid_mid"].dtype == {"bfloat16": np.uint16, "float16": np.float16}[dtype]
    buffer = DiscBuffer(result.path, batch_size=62)
    rows = buffer.read(0, 62)
    assert rows.resid_mid.dtype == rows.mlp_out.dtype == getattr(torch, dtype)
    tokens, sequence, position = buffer.token_info()
    ids = torch.from_numpy(buffer.sequences).long()
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(4))
    assert torch.equal(rows.resid_mid, resid[sequence, position].to(getattr(torch, dtype)))
    assert torch.equal(rows.mlp_out, mlp[sequence, position].to(getattr(torch, dtype)))
    # The statistics are sums over the stored (rounded) values of every 8th row of each 31-row shard.
    picked = [*range(0, 31, STATS_STRIDE), *range(31, 62, STATS_STRIDE)]
    stats = buffer.stats
    assert torch.allclose(
        stats.input_mean, rows.resid_mid[picked].double().mean(0).float(), rtol=1e-5, atol=1e-6
    )


def test_harvest_a_llama_model(tmp_path, tiny_llama):
    config = HarvestConfig(model="tiny-llama", n_tokens=45, seq_len=16, batch_size=3, dtype="float32")
    result = harvest(config, tmp_path / "llama", model=tiny_llama, progress=False)
    buffer = DiscBuffer(result.path, batch_size=45)
    assert (buffer.n_layers, buffer.d_model, buffer.n_tokens) == (3, 32, 45)
    tokens, sequence, position = buffer.token_info()
    ids = harvested_sequences(tiny_llama, config, 3)
    resid, mlp = hooked_sites(tiny_llama, ids, range(3))
    rows = buffer.read(0, 45)
    assert torch.equal(rows.resid_mid, resid[sequence, position])
    assert torch.equal(rows.mlp_out, mlp[sequence, position])


# ------------------------------------------------------------------------------------------------ reuse and refusal


def test_finished_harvest_is_reused(tmp_path, tiny_gpt2, count_forwards):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, dtype="float32")
    path = tmp_path / "small"
    first = harvest(config, path, model=tiny_gpt2, progress=False)
    assert first.path == path and first.n_tokens == 62 and first.complete and not first.reused
    assert first.seconds > 0 and first.tokens_per_second > 0 and len(count_forwards) == 1
    before = snapshot(path)
    again = harvest(config, path, model=tiny_gpt2, progress=False)
    assert again.reused and again.complete and again.n_tokens == 62 and again.seconds == 0.0
    assert len(count_forwards) == 1  # nothing run again
    assert snapshot(path) == before


@pytest.fixture(scope="module")
def half_done(tmp_path_factory, harvest_config, tiny_gpt2) -> Path:
    """The session buffer's harvest with only job 0 of 2 done: shards 0 and 2 of 3, no shard 1."""
    path = tmp_path_factory.mktemp("jobs") / "acts"
    result = harvest(harvest_config, path, model=tiny_gpt2, job=(0, 2), progress=False)
    assert not result.complete and result.n_tokens == 248 + 4
    return path


CHANGES = {
    "model": dict(model="tiny-llama"),
    "layers": dict(layers=(0, 2)),
    "dtype": dict(dtype="float16"),
    "seq_len": dict(seq_len=16),
    "n_tokens": dict(n_tokens=400),
    "batch_size": dict(batch_size=2),
    "split": dict(split="eval"),
    "model_dtype": dict(model_dtype="bfloat16"),
}
CHANGED_FIELD = {"layers": "layer_stop"}


@pytest.mark.parametrize("state", ["complete", "unfinished"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_existing_harvest_with_other_arguments_is_refused_and_untouched(
    tmp_path, buffer_path, half_done, tiny_gpt2, tiny_llama, state, change
):
    path = tmp_path / "acts"
    shutil.copytree(buffer_path if state == "complete" else half_done, path)
    before = snapshot(path)
    config = HarvestConfig(**{**BUFFER_CONFIG, **CHANGES[change]})
    model = tiny_llama if change == "model" else tiny_gpt2
    with pytest.raises(
        ValueError, match=r"was harvested with different arguments \((.*)\); delete the folder"
    ) as info:
        harvest(config, path, model=model, progress=False)
    changed = str(info.value).split("different arguments (")[1].split(")")[0].split(", ")
    assert CHANGED_FIELD.get(change, change) in changed
    assert snapshot(path) == before


def test_changed_shard_size_is_refused(tmp_path, buffer_path, tiny_gpt2):
    path = tmp_path / "acts"
    shutil.copytree(buffer_path, path)
    before = snapshot(path)
    config = HarvestConfig(**{**BUFFER_CONFIG, "shard_tokens": 124})
    with pytest.raises(ValueError, match=r"different arguments \(.*shard_(tokens|batches).*\)"):
        harvest(config, path, model=tiny_gpt2, progress=False)
    assert snapshot(path) == before


def test_path_that_is_a_file_is_refused_and_untouched(tmp_path, harvest_config, tiny_gpt2):
    path = tmp_path / "notes.h5"
    path.write_text("my notes, not activations")
    with pytest.raises(ValueError, match=r"notes\.h5 is a file; a harvest writes a folder"):
        harvest(harvest_config, path, model=tiny_gpt2, progress=False)
    assert path.read_text() == "my notes, not activations"


def test_corrupt_manifest_is_a_clear_error(tmp_path, half_done, harvest_config, tiny_gpt2):
    path = tmp_path / "acts"
    shutil.copytree(half_done, path)
    (path / "manifest.json").write_text('{"format": "cltlab.activations", "shards": [')
    before = snapshot(path)
    with pytest.raises(ValueError, match=r"acts/manifest\.json"):
        harvest(harvest_config, path, model=tiny_gpt2, progress=False)
    assert snapshot(path) == before


def test_layers_beyond_the_model_are_refused(tmp_path, tiny_gpt2):
    config = HarvestConfig(model="tiny-gpt2", n_tokens=62, seq_len=32, batch_size=2, layers=(2, 6))
    with pytest.raises(ValueError, match=r"layers \(2, 6\) exceed the 4 layers of 'tiny-gpt2'"):
        harvest(config, tmp_path / "x", model=tiny_gpt2, progress=False)
    assert not (tmp_path / "x").exists()


def test_corpus_too_small_is_a_clear_error(tmp_path, tiny_gpt2):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(f"a short document number {i}" for i in range(9)))
    config = HarvestConfig(model="tiny-gpt2", corpus=str(corpus), n_tokens=1000, seq_len=8, batch_size=2)
    with pytest.raises(
        ValueError, match=r"tiny\.txt' \(train\) ran out before batch \d+ of 72; ask for fewer tokens"
    ):
        harvest(config, tmp_path / "x", model=tiny_gpt2, progress=False)
    with pytest.raises((FileNotFoundError, ValueError), match="harvest"):
        DiscBuffer(tmp_path / "x", batch_size=2)


# ------------------------------------------------------------------------------------------------ jobs


def test_jobs_fill_one_folder(tmp_path, half_done, buffer_path, harvest_config, tiny_gpt2, count_forwards):
    path = tmp_path / "acts"
    shutil.copytree(half_done, path)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "shard-00000.h5", "shard-00002.h5"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["complete"], manifest["n_written"], len(manifest["shards"])) == (False, 252, 2)
    with pytest.raises(
        ValueError, match=r"acts is an unfinished harvest \(2 of 3 shards, 252 of 500 tokens\)"
    ):
        DiscBuffer(path, batch_size=100)
    second = harvest(harvest_config, path, model=tiny_gpt2, job=(1, 2), progress=False)
    assert second.complete and not second.reused and second.n_tokens == 500
    assert len(count_forwards) == 2  # only shard 1's two forward batches
    assert differences(path, buffer_path) == []
    assert len(DiscBuffer(path, batch_size=100)) == 5
    again = harvest(harvest_config, path, model=tiny_gpt2, job=(0, 2), progress=False)
    assert again.reused and again.complete and len(count_forwards) == 2


@pytest.mark.parametrize("job", [(2, 2), (-1, 2), (0, 0)])
def test_bad_job_is_refused(tmp_path, harvest_config, tiny_gpt2, job):
    with pytest.raises(
        ValueError, match=rf"job must be \(i, n\) with 0 <= i < n, not \({job[0]}, {job[1]}\)"
    ):
        harvest(harvest_config, tmp_path / "x", model=tiny_gpt2, job=job, progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ SIGKILL and resume

# 15,000 rows from 121 forward batches of 124 rows (about a second on a CPU), 32 batches per shard: 4 shards.
KILL_CONFIG = dict(
    model="tiny-gpt2", n_tokens=15_000, seq_len=32, batch_size=4, dtype="float32", shard_tokens=4_000
)
KILL_BATCHES = 121

# Runs KILL_CONFIG in a fresh interpreter. Prints "<shard file> <batches>" after each progress update; in the
# "before-progress" mode it kills itself just before writing progress <batches> of <shard file> (after the
# batch's rows and statistics), in the "before-rename" mode just before renaming <shard file> to its final name,
# in the "pause" mode it waits for a line on stdin after writing progress <batches> of <shard file>.
CHILD = r"""
import json, os, signal, sys
import h5py, numpy as np, torch
path, mode, target, threads, config, job = sys.argv[1:7]
torch.set_num_threads(int(threads))
from cltlab import harvest
from cltlab.config import HarvestConfig
from cltlab.models import load_model

def die():
    os.kill(os.getpid(), signal.SIGKILL)

setitem = h5py.Dataset.__setitem__
def watched_setitem(self, key, value):
    if self.name == "/progress" and np.ndim(value) == 1:
        shard = os.path.basename(self.file.filename)
        if mode == "before-progress" and target == f"{shard}:{int(value[1])}":
            die()
        setitem(self, key, value)
        print(shard, int(value[1]), flush=True)
        if mode == "pause" and target == f"{shard}:{int(value[1])}":
            sys.stdin.readline()  # hold the harvest here until the test says go on
    else:
        setitem(self, key, value)
h5py.Dataset.__setitem__ = watched_setitem

replace = os.replace
def watched_replace(src, dst, **kwargs):
    if mode == "before-rename" and os.path.basename(src) == target:
        die()
    return replace(src, dst, **kwargs)
os.replace = watched_replace

harvest(HarvestConfig(**json.loads(config)), path, model=load_model("tiny-gpt2"), device="cpu", progress=False,
        job=tuple(json.loads(job)))
"""


def run_child(folder: Path, mode: str, target: str = "", *, kill_when=None, delay: float = 0.0) -> None:
    """Harvest KILL_CONFIG into ``folder`` in a subprocess that must end by SIGKILL: its own (``mode``) or ours,
    ``delay`` seconds after ``kill_when(shard, batches)`` first holds for a progress line it prints."""
    stderr = folder.with_name(folder.name + ".stderr")
    args = [str(folder), mode, target, str(torch.get_num_threads()), json.dumps(KILL_CONFIG), "[0, 1]"]
    with open(stderr, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        for line in child.stdout:
            shard, batches = line.split()
            if kill_when is not None and kill_when(shard, int(batches)):
                time.sleep(delay)
                child.send_signal(signal.SIGKILL)
                break
        child.wait()
    finally:
        watchdog.cancel()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL, (
        f"the harvest was to be killed ({mode} {target}, delay {delay:.3f} s) but exited with "
        f"{child.returncode}:\n{stderr.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_gpt2) -> Path:
    path = tmp_path_factory.mktemp("uninterrupted") / "acts"
    result = harvest(HarvestConfig(**KILL_CONFIG), path, model=tiny_gpt2, device="cpu", progress=False)
    assert result.complete and result.n_tokens == 15_000
    assert [s["n_rows"] for s in json.loads((path / "manifest.json").read_text())["shards"]] == [
        3968,
        3968,
        3968,
        3096,
    ]
    return path


def resume(folder: Path, model: LoadedModel, forwards: list[int]) -> int:
    """Harvest again into a killed folder; check it ran exactly the batches the disk did not vouch for."""
    done = batches_on_disk(folder)
    result = harvest(HarvestConfig(**KILL_CONFIG), folder, model=model, device="cpu", progress=False)
    assert result.complete and not result.reused and result.n_tokens == 15_000
    assert len(forwards) == KILL_BATCHES - done, f"{done} batches were on disk"
    return done


KILL_POINTS = {
    # Shard 0 (of 32 batches) has written 3; the kill lands mid-first-shard.
    "mid-first-shard": lambda shard, batches: shard == "shard-00000.h5.partial" and batches >= 3,
    # Shards 0 and 1 are finished and shard 2 has written 3 batches.
    "third-shard": lambda shard, batches: shard == "shard-00002.h5.partial" and batches >= 3,
}


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_resume_after_sigkill_equals_an_uninterrupted_run(
    tmp_path, tiny_gpt2, uninterrupted, count_forwards, kill_point
):
    folder = tmp_path / "acts"
    seed = int(os.environ.get("CLTLAB_KILL_SEED") or random.randrange(2**32))
    delay = random.Random(seed).uniform(0.0, 0.1)
    print(f"kill delay {delay:.3f} s from seed {seed} (CLTLAB_KILL_SEED={seed} repeats it)")
    run_child(folder, "watch", kill_when=KILL_POINTS[kill_point], delay=delay)
    finished = finished_shards(folder)
    if kill_point == "third-shard":
        assert {"shard-00000.h5", "shard-00001.h5"} <= set(finished)
    before = snapshot(folder)
    with pytest.raises((FileNotFoundError, ValueError)):
        DiscBuffer(folder, batch_size=100)  # not usable until finished
    # Refused with other arguments, and left exactly as the kill left it.
    with pytest.raises(ValueError, match=r"different arguments \(.*n_tokens.*\)"):
        harvest(HarvestConfig(**{**KILL_CONFIG, "n_tokens": 14_000}), folder, model=tiny_gpt2, progress=False)
    assert snapshot(folder) == before

    done = resume(folder, tiny_gpt2, count_forwards)
    killed = f"killed {delay:.3f} s after the mark (CLTLAB_KILL_SEED={seed})"
    assert done >= (2 if kill_point == "mid-first-shard" else 64 + 2), killed
    # Finished shards were kept as they were, not written again.
    assert {name: ident for name, ident in finished_shards(folder).items() if name in finished} == finished
    assert differences(folder, uninterrupted) == [], killed


def test_resume_after_sigkills_at_the_commit_points(tmp_path, tiny_gpt2, uninterrupted, count_forwards):
    """Killed between a batch's rows and its progress, then (resuming) just before a shard's rename."""
    folder = tmp_path / "acts"
    run_child(folder, "before-progress", "shard-00000.h5.partial:3")
    assert batches_on_disk(folder) == 2
    run_child(folder, "before-rename", "shard-00001.h5.partial")
    assert not (folder / "shard-00001.h5").exists() and (folder / "shard-00000.h5").exists()
    assert batches_on_disk(folder) >= 64
    resume(folder, tiny_gpt2, count_forwards)
    assert differences(folder, uninterrupted) == []


def test_resume_when_only_the_manifest_is_missing(tmp_path, tiny_gpt2, uninterrupted, count_forwards):
    """The state a kill leaves just before the manifest is written: every shard finished, no manifest."""
    folder = tmp_path / "acts"
    shutil.copytree(uninterrupted, folder)
    (folder / "manifest.json").unlink()
    shards = {p.name: p.read_bytes() for p in folder.glob("shard-*.h5")}
    result = harvest(HarvestConfig(**KILL_CONFIG), folder, model=tiny_gpt2, progress=False)
    assert result.complete and result.n_tokens == 15_000 and not count_forwards
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*.h5")} == shards
    assert differences(folder, uninterrupted) == []


# ------------------------------------------------------------------------------------------------ two harvests at once


# 2,000 rows in 17 forward batches of 124 rows, 4 batches per shard: shards of 496 rows and a last one of 16.
LOCK_CONFIG = dict(
    model="tiny-gpt2", n_tokens=2000, seq_len=32, batch_size=4, dtype="float32", shard_tokens=500
)


def test_a_second_harvest_of_the_same_shards_is_refused_and_deletes_nothing(tmp_path, tiny_gpt2):
    """Job 0/2 runs in another process (held after its shard 0's second batch): harvests that would write its
    shards are refused naming it and change nothing; job 1/2 runs beside it; together they equal one run."""
    folder = tmp_path / "acts"
    stderr = tmp_path / "child.stderr"
    config = HarvestConfig(**LOCK_CONFIG)
    threads = str(torch.get_num_threads())
    args = [str(folder), "pause", "shard-00000.h5.partial:2", threads, json.dumps(LOCK_CONFIG), "[0, 2]"]
    with open(stderr, "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        for line in child.stdout:
            if line.split() == ["shard-00000.h5.partial", "2"]:
                break
        else:
            pytest.fail(f"the first harvest ended early:\n{stderr.read_text()[-3000:]}")
        partial = folder / "shard-00000.h5.partial"
        held = (partial.stat().st_ino, partial.stat().st_mtime_ns)
        before = snapshot(folder)
        holder = (
            rf"pid {child.pid} on {re.escape(socket.gethostname())} \(started \d{{4}}-\d\d-\d\dT[\d:]{{8}}Z\)"
        )
        for job in [(0, 1), (0, 2), (2, 4)]:
            with pytest.raises(
                HarvestBusy,
                match=rf"acts is being harvested by {holder} as job 0/2, which writes shards of job "
                rf"{job[0]}/{job[1]} too; wait for it to finish .* Nothing was changed\.",
            ):
                harvest(config, folder, model=tiny_gpt2, job=job, progress=False)
        assert snapshot(folder) == before
        assert (partial.stat().st_ino, partial.stat().st_mtime_ns) == held
        beside = harvest(config, folder, model=tiny_gpt2, job=(1, 2), progress=False)
        assert not beside.complete and beside.n_tokens == 2 * 496  # shards 1 and 3
        child.stdin.write("go on\n")
        child.stdin.close()
        child.stdout.read()
        assert child.wait() == 0, stderr.read_text()[-3000:]
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
    uninterrupted = harvest(config, tmp_path / "reference", model=tiny_gpt2, progress=False).path
    assert differences(folder, uninterrupted) == []
