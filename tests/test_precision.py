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


KEPT = """
import ctypes, torch
from cltlab.precision import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's heap statistics
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
print(keep_freed_memory())
block = torch.ones(6 << 20)  # 24 MiB, as a training step's activations
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own (unmapped when freed, faulted in again)
del block
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)  # MiB mapped apart while it lived; MiB free in the heap after
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_freed_memory_is_kept_for_the_next_tensors(keep):
    env = {**os.environ, "CLTLAB_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", KEPT], env=env, capture_output=True, text=True, check=True)
    was_set, mapped, free = out.stdout.split()
    assert was_set == ("True" if keep == "1" else "False")
    # By default glibc maps a 24 MiB block on its own and unmaps it when freed, so the next step faults its
    # pages in again; kept, it comes from the heap and stays there, free for the next tensors. (Page-fault counts
    # told the same story but varied from run to run with the heap's layout.)
    if keep == "1":
        assert int(mapped) < 24 and int(free) >= 24
    else:
        assert int(mapped) >= 24 and int(free) < 24
