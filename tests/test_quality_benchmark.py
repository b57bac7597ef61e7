"""The pure helpers of benchmarks/quality.py: layer ranges, the λ search toward a target L0, interpolation."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "quality", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def run(lam: float, l0: float, nmse: float = 0.5) -> quality.Run:
    return quality.Run("plt", lam, l0, nmse, 0.8, 0.1, 0.7, 0.0, 1.0)


def test_parse_layers():
    assert quality.parse_layers("0:12") == (0, 12)
    assert quality.parse_layers("all") is None


def test_next_lambda_one_run_uses_the_guessed_slope():
    # L0 ∝ λ^SLOPE_GUESS: halving L0 takes λ × 2^(-1 / SLOPE_GUESS)
    expected = 1e-3 * 2 ** (-1 / quality.SLOPE_GUESS)
    assert quality.next_lambda([run(1e-3, 40.0)], target=20.0) == pytest.approx(expected, rel=1e-2)


def test_next_lambda_secant_hits_a_power_law():
    l0 = lambda lam: 5.0 * lam**-0.5  # noqa: E731
    runs = [run(1e-4, l0(1e-4)), run(4e-4, l0(4e-4))]
    assert quality.next_lambda(runs, target=l0(1e-3)) == pytest.approx(1e-3, rel=1e-2)


def test_next_lambda_step_is_capped():
    assert quality.next_lambda([run(1e-3, 1000.0)], target=1.0, max_factor=10.0) == pytest.approx(1e-2)


def test_closest_and_interpolate():
    runs = [run(1e-4, 40.0, nmse=0.2), run(1e-3, 10.0, nmse=0.6)]
    assert quality.closest(runs, 15.0).lam == 1e-3
    mid = quality.interpolate(runs, 20.0)
    assert mid["nmse"] == pytest.approx(0.6 + (0.2 - 0.6) * math.log(2) / math.log(4))
    assert quality.interpolate(runs, 50.0) is None


def test_path_length_weights_each_path_by_the_influence_it_carries():
    from types import SimpleNamespace

    # nodes: 0 a feature, 1 the token, 2 the logit; A[target, source]. The logit reads the feature 3:1 over the
    # token, and the feature reads the token: 1/4 of the influence arrives in one edge, 3/4 in two.
    adjacency = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.0]])
    graph = SimpleNamespace(
        adjacency=adjacency,
        logit_weights=lambda: torch.tensor([0.0, 0.0, 1.0]),
        token_start=1,
        logit_start=2,
        n_layers=1,
    )
    assert quality.path_length(graph) == pytest.approx(0.25 * 1 + 0.75 * 2)


def test_path_length_counts_edges_from_tokens_to_logits(tiny_gpt2):
    from helpers import make_clt

    import cltlab

    silent = make_clt(tiny_gpt2.n_layers, tiny_gpt2.d_model, 16, threshold_init=1e6)
    direct = cltlab.attribute(tiny_gpt2, silent, "The cat sat on the mat", progress=False)
    assert quality.path_length(direct) == pytest.approx(1.0)  # without features, tokens reach logits directly
    busy = make_clt(tiny_gpt2.n_layers, tiny_gpt2.d_model, 32, threshold_init=0.5)
    graph = cltlab.attribute(tiny_gpt2, busy, "The cat sat on the mat", progress=False)
    # some influence now goes through features; a path visits at most one feature per layer (a feature writes
    # to later layers only), so no path is longer than n_layers + 1 edges
    assert 1.0 < quality.path_length(graph) <= tiny_gpt2.n_layers + 1
