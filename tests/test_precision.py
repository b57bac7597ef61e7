"""bf16 falls back to float32 only on CPUs where it is slow, and says so."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from cltlab import precision


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_requests_follow_the_cpu(monkeypatch, caplog, fast):
    monkeypatch.setattr(precision, "fast_bfloat16_cpu", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="cltlab"):
        assert precision.training_precision("bf16-mixed", accelerator="cpu") == (
            "bf16-mixed" if fast else "32-true"
        )
        assert precision.model_dtype("bfloat16", "cpu") == ("bfloat16" if fast else "float32")
    assert ("no fast bfloat16" in caplog.text) is not fast
    # Other requests, and other devices, are left alone.
    assert precision.training_precision("32-true", accelerator="cpu") == "32-true"
    assert precision.training_precision("bf16-mixed", accelerator="gpu") == "bf16-mixed"
    assert precision.model_dtype("float16", "cpu") == "float16"
    assert precision.model_dtype("bfloat16", "cuda") == "bfloat16"


def test_the_measurement_is_a_cached_bool():
    assert isinstance(precision.fast_bfloat16_cpu(), bool)
    assert precision.fast_bfloat16_cpu.cache_info().currsize == 1


def test_devices_resolve_to_this_machine(monkeypatch):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert precision.resolve_device("auto").type == expected
    assert precision.resolve_device(None).type == expected
    assert precision.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, not 'gpu'"):
        precision.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="asks for a GPU, and torch sees none here"):
        precision.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert precision.resolve_device("auto") == torch.device("cuda")
    assert precision.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="this machine has 2 GPU"):
        precision.resolve_device("cuda:2")


def test_model_dtype_reads_auto_like_every_other_device(monkeypatch):
    monkeypatch.setattr(precision, "fast_bfloat16_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.model_dtype("bfloat16", "auto") == "float32"  # auto is this CPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert precision.model_dtype("bfloat16", "auto") == "bfloat16"


def test_cltlab_device_decides_what_auto_means(monkeypatch):
    monkeypatch.setenv("CLTLAB_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert precision.resolve_device("auto") == torch.device("cpu")  # though a GPU is there
    assert precision.resolve_device("cuda") == torch.device("cuda")  # a named device is taken as named
    assert (
        precision.lightning_accelerator("auto") == "cpu" and precision.lightning_accelerator("gpu") == "gpu"
    )
    assert precision.uses_cpu(None, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CLTLAB_DEVICE", "cuda")
    with pytest.raises(ValueError, match="asks for a GPU, and torch sees none here"):
        precision.resolve_device("auto")
    monkeypatch.delenv("CLTLAB_DEVICE")
    assert precision.lightning_accelerator("auto") == "auto"


@pytest.mark.parametrize("fast", [True, False])
def test_the_harvest_model_is_loaded_as_harvest_runs_it(monkeypatch, fast):
    # Notebook 01 loads its model with this; a bf16 model on a CPU without fast bf16 ran the harvest ~5x slower.
    from cltlab import load_harvest_model
    from cltlab.config import HarvestConfig

    monkeypatch.setattr(precision, "fast_bfloat16_cpu", lambda: fast)
    model = load_harvest_model(HarvestConfig(model="tiny-gpt2", model_dtype="bfloat16"), "cpu")
    assert model.model.dtype == (torch.bfloat16 if fast else torch.float32)
    assert load_harvest_model(HarvestConfig(model="tiny-gpt2"), "cpu").model.dtype == torch.float32


FAULTS = """
import resource, sys, torch
from cltlab.precision import keep_freed_memory
print(keep_freed_memory())
def step():  # blocks of 8, 16 and 24 MiB alive together, as a training step's activations, then freed
    blocks = [torch.ones(n << 20) for n in (2, 4, 6)]
    return sum(block.sum() for block in blocks)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_freed_memory_is_reused_instead_of_faulted_in_again(keep):
    env = {**os.environ, "CLTLAB_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    was_set, faults = out.stdout.split()
    assert was_set == ("True" if keep == "1" else "False")
    # 10 steps of 12,288 pages: by default glibc maps the largest block afresh every step, or all three
    # (30,665 or 122,537 faults in 25 runs here); kept, the first step's memory serves the rest, with at most one
    # or two blocks' worth faulted in again as the heap settles (0 in 17 of 25 runs, at most 12,288)
    assert (int(faults) < 20_000) if keep == "1" else (int(faults) > 25_000)
