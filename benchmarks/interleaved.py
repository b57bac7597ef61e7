"""Side-by-side step timing for ``benchmarks/peers.py``: one optimizer per side, the sides' steps taken in turn,
the median kept; and a one-step operator profile."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

LR = 1e-4


def training_step(params, loss_fn: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], None]:
    """One step: ``loss_fn()`` (under autocast unless float32), backward, and a fused Adam step of its own."""
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=LR, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class Timing(NamedTuple):
    """Seconds per step over the timed steps."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median * 1e3:.0f} ms/step ({self.low * 1e3:.0f}–{self.high * 1e3:.0f})"


def interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, Timing]:
    """Each step's timing, taking them in turn (order reversed every other round) so that any other load on
    the machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for name in order:
            start = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), max(t)) for name, t in times.items()}


def profile(label: str, step: Callable[[], None], rows: int = 10) -> None:
    """Print the top operators of one step by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{label}: top operators of one step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
