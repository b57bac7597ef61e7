"""What a feature reads and writes: its activations on given tokens, its decoder norm per target layer, and the
output tokens its decoder vectors promote and suppress through the unembedding.

These complement the corpus statistics of ``features.py`` for one feature at a time (the FeatureBrowser's views).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .clt import CrossLayerTranscoder
from .models import LoadedModel
from .sites import trace_sites


@torch.no_grad()
def feature_activations(
    model: LoadedModel, clt: CrossLayerTranscoder, ids: torch.Tensor, layer: int
) -> torch.Tensor:
    """Features of CLT ``layer`` on every token of ``ids`` ``(batch, seq)`` in the original model:
    ``(batch, seq, d_features)``. ``ids`` start with BOS, as in the harvest."""
    at = clt.config.layer_offset + layer
    x = trace_sites(model, ids, at, at + 1).resid_mid[:, :, 0]  # (batch, seq, d_model)
    x = x.float().to(clt.W_enc.device)
    return clt.encode_layer(x, layer).cpu()


def decoder_norms_by_target(clt: CrossLayerTranscoder, layer: int, feature: int) -> torch.Tensor:
    """``(n_targets,)`` norm of the feature's decoder vector for each layer it writes to, in the units of that
    layer's ``mlp_out`` (targets are CLT layers ``layer, layer + 1, …``; only ``layer`` for a per-layer
    transcoder)."""
    W = clt.W_dec[layer][feature].detach()  # (n_targets, d_model), normalized units
    targets = torch.arange(layer, layer + W.shape[0]) if clt.config.cross_layer else torch.tensor([layer])
    return (W.norm(dim=-1) * clt.output_scale[targets, 0].detach()).cpu()


class TokenEffects(NamedTuple):
    """The output tokens a feature's decoder pushes up and down, with their direct logit effects."""

    promoted: list[tuple[int, float]]
    """``(token id, logit change per unit of activation)``, largest first."""
    suppressed: list[tuple[int, float]]
    """The same for the most negative, most negative first."""


@torch.no_grad()
def logit_effects(
    clt: CrossLayerTranscoder, unembedding: torch.Tensor, layer: int, feature: int, *, n: int = 10
) -> TokenEffects:
    """Direct effect on the logits of one unit of the feature: the sum of its decoder vectors (in model units)
    through ``unembedding`` ``(vocab, d_model)``. The final norm's scaling is left out (a logit-lens view)."""
    direction = feature_directions(clt, layer, feature)  # (d_model,)
    logits = unembedding.float().to(direction.device) @ direction  # (vocab,)
    up, down = logits.topk(n), (-logits).topk(n)
    return TokenEffects(
        list(zip(up.indices.tolist(), up.values.tolist(), strict=True)),
        list(zip(down.indices.tolist(), (-down.values).tolist(), strict=True)),
    )


def feature_directions(
    clt: CrossLayerTranscoder, layer: int, feature: int | slice = slice(None)
) -> torch.Tensor:
    """What one unit of a feature (or of each of ``layer``'s features) adds to the residual stream over all the
    layers it writes to: the sum of its decoder vectors in model units, ``(d_model,)`` (or ``(d_features,
    d_model)``)."""
    W = clt.W_dec[layer][feature].detach()  # (n_targets, d_model) or (d_features, n_targets, d_model)
    n_targets = W.shape[-2]
    targets = torch.arange(layer, layer + n_targets) if clt.config.cross_layer else torch.tensor([layer])
    return (W * clt.output_scale[targets]).sum(-2)


def unembedding(model: LoadedModel) -> torch.Tensor:
    """The model's unembedding matrix ``(vocab, d_model)``."""
    return model.model.get_output_embeddings().weight.detach()
