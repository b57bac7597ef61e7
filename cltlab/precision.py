"""bfloat16 only where the hardware computes it fast; freed memory kept for reuse on glibc.

CPUs without bf16 instructions (AVX2-only x86, e.g. many AMD EPYC cloud machines) run a bf16 matmul through a
slow fallback: measured 0.86 GFLOP/s against 24 GFLOP/s in float32 on such a machine, which turns the default
profile's bf16 training step from about a second into a minute. The profiles ask for bf16; these helpers keep
the request where it pays and fall back to float32 (with a warning) where it does not.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import time

import torch

log = logging.getLogger("cltlab")


# glibc's mallopt options, with the values keep_freed_memory sets: blocks up to 32 MiB (the largest it allows)
# from the heap, which keeps up to 2 GiB freed at its top and grows 1 GiB at a time.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOPT = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 1 << 30))


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next tensors instead of returning it to the system; True if it was set.

    By default glibc maps each large block (a batch's activations, a sequence's logits: tens of MB) fresh and
    unmaps it when freed, so every training step faults and zeroes its pages again: on the default profile's
    2-core CPU a third of an end-to-end step (3.3 → 2.2 s, 280,000 page faults → 20,000) and time in every other
    stage. The process keeps its peak memory instead. Linux with glibc only; ``CLTLAB_KEEP_FREED_MEMORY=0`` turns
    it off (as the ``MALLOC_*_`` environment variables would set it for a whole process).
    """
    if not sys.platform.startswith("linux") or os.environ.get("CLTLAB_KEEP_FREED_MEMORY") == "0":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    return mallopt is not None and all(mallopt(option, value) == 1 for option, value in MALLOPT)


@functools.cache
def fast_bfloat16_cpu() -> bool:
    """True when a bf16 matmul on this CPU is at most twice as slow as a float32 one (measured once on one
    thread, ~0.2 s; the fastest of several calls, so that a busy machine does not decide it)."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # one core's arithmetic: with several threads, a busy machine stalls the short calls

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        return seconds(torch.bfloat16) <= 2 * seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): the device ``$CLTLAB_DEVICE`` names (``cltlab run --device``), else the GPU when there
    is one, else the CPU; any other name is checked, so a run asking for a GPU it does not have fails at once with
    one message instead of deep inside a model."""
    if device is None or device == "auto":
        chosen = os.environ.get("CLTLAB_DEVICE", "auto")
        if chosen != "auto":
            return resolve_device(chosen)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for a GPU, and torch sees none here; use auto or cpu.")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s).")
    return resolved


def available_memory(device: torch.device) -> int:
    """Bytes free now on ``device``: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def uses_cpu(device: str | torch.device | None, accelerator: str = "auto") -> bool:
    """Whether work for ``device`` (or, without one, Lightning's ``accelerator``) runs on the CPU."""
    if (
        device is not None
    ):  # 'auto' is where resolve_device would put the work; other names are taken as they are
        return (resolve_device() if device == "auto" else torch.device(device)).type == "cpu"
    return accelerator == "cpu" or (accelerator == "auto" and resolve_device().type == "cpu")


def lightning_accelerator(accelerator: str) -> str:
    """Lightning's ``accelerator`` for the config's: ``auto`` follows ``resolve_device`` (``$CLTLAB_DEVICE``)."""
    if accelerator != "auto" or os.environ.get("CLTLAB_DEVICE", "auto") == "auto":
        return accelerator
    return "cpu" if resolve_device().type == "cpu" else "gpu"


def training_precision(precision: str, *, accelerator: str = "auto") -> str:
    """``precision`` for Lightning, or ``32-true`` when it asks for bf16 on a CPU without fast bf16."""
    if precision.startswith("bf16") and uses_cpu(None, accelerator) and not fast_bfloat16_cpu():
        log.warning("This CPU has no fast bfloat16 matmul: training in float32 instead of %s.", precision)
        return "32-true"
    return precision


def model_dtype(dtype: str, device: str | torch.device) -> str:
    """``dtype`` for running a model on ``device``, or ``float32`` for bf16 on a CPU without fast bf16."""
    if dtype == "bfloat16" and uses_cpu(device) and not fast_bfloat16_cpu():
        log.warning("This CPU has no fast bfloat16 matmul: running the model in float32 instead.")
        return "float32"
    return dtype
