"""Helpers shared by the tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import time

import torch

from cltlab import CrossLayerTranscoder, evaluate
from cltlab.config import CLTConfig, EvalConfig
from cltlab.models import LoadedModel
from cltlab.replacement import ReplacementMetrics


def random_ids(model: LoadedModel, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``(batch, seq)`` with BOS at position 0, as the harvest and replacement model expect."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 5000, (batch, seq), generator=generator)
    ids[:, 0] = model.bos_token_id
    return ids


def held_out_metrics(model: LoadedModel, clt: CrossLayerTranscoder) -> ReplacementMetrics:
    """``evaluate`` as a training run's validation measures it on the ``buffer_path`` fixture's harvest: 2
    held-out Shakespeare sequences of 32 tokens."""
    config = EvalConfig(n_sequences=2, batch_size=2)
    return evaluate(model, clt, corpus="shakespeare", seq_len=32, config=config, progress=False)


def make_clt(
    n_layers: int = 4,
    d_model: int = 8,
    d_features: int = 16,
    *,
    cross_layer: bool = True,
    layer_offset: int = 0,
    seed: int = 0,
    normalization: bool = True,
    threshold_init: float = 1e-3,
    activation_kind: str = "jumprelu",
    k: int = 4,
) -> CrossLayerTranscoder:
    """A transcoder with every parameter randomized (so features fire and every decoder block matters)."""
    config = CLTConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_features=d_features,
        cross_layer=cross_layer,
        threshold_init=threshold_init,
        layer_offset=layer_offset,
        activation_kind=activation_kind,
        k=k,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clt = CrossLayerTranscoder(config)
        with torch.no_grad():
            clt.W_enc.normal_(0, 1 / d_model**0.5)
            clt.b_enc.normal_(0, 0.1)
            for W in clt.W_dec:
                W.normal_(0, 0.3)
            clt.b_dec.normal_(0, 0.1)
            # Thresholds spread around threshold_init so they are not all equal.
            clt.activation.log_threshold.add_(torch.randn(n_layers, d_features) * 0.3)
            if normalization:
                clt.set_normalization(
                    torch.randn(n_layers, d_model) * 0.5,
                    torch.rand(n_layers, 1) * 2 + 0.5,
                    torch.randn(n_layers, d_model) * 0.5,
                    torch.rand(n_layers, 1) * 2 + 0.5,
                )
    return clt.eval()


@torch.no_grad()
def hooked_sites(model: LoadedModel, ids: torch.Tensor, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
    """``resid_mid`` and ``mlp_out`` ``(batch, seq, n_layers, d_model)`` taken with plain forward hooks."""
    resid, mlp, handles = {}, {}, []
    for layer in layers:
        handles.append(
            model.pre_mlp_norm(layer).register_forward_pre_hook(
                lambda module, args, layer=layer: resid.__setitem__(layer, args[0].clone())
            )
        )
        handles.append(
            model.mlp(layer).register_forward_hook(
                lambda module, args, output, layer=layer: mlp.__setitem__(layer, output.clone())
            )
        )
    try:
        model.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([resid[i] for i in layers], 2), torch.stack([mlp[i] for i in layers], 2)


def assert_exact(batch, reference) -> None:
    """A served batch holds exactly the rows the DiscBuffer reads for its index (``reference``: every batch)."""
    expected = reference[batch.index % len(reference)]
    assert torch.equal(batch.resid_mid, expected.resid_mid) and torch.equal(batch.mlp_out, expected.mlp_out)


def wait_until(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def feature_clt(stats) -> CrossLayerTranscoder:
    """The seeded 4-layer × 12-feature CLT of the feature tests (statistics, widgets, dashboard): normalized with
    ``stats`` (a buffer's), thresholds at 0.5, and features 0–2 of layer 2 that never fire."""
    clt = make_clt(4, 64, 12, normalization=False, threshold_init=0.5, seed=5)
    clt.set_normalization(*stats)
    with torch.no_grad():
        clt.activation.log_threshold[2, :3] = 10.0
    return clt
