"""Interventions: set, scale or zero CLT features at chosen positions and see the next-token distribution move.

The model runs with every MLP replaced by the CLT's reconstruction plus the error term measured on the
unmodified prompt (so with no intervention it reproduces the original logits). Features are re-encoded from
the intervened model's own residual stream, except the intervened ones (and all of them with
``hold_features=True``). ``freeze_attention=True`` holds attention patterns and norm denominators at their values
on the prompt — the local replacement model in which the attribution graph is exact; ``False`` lets them move.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..clt import CrossLayerTranscoder
from ..models import LoadedModel
from .local import LocalReplacement, check_fits, prompt_ids, transcode


class Intervention(NamedTuple):
    """One feature to change: give ``value`` (the activation to set; 0 zeroes it) or ``scale`` (a factor on its
    activation on the unmodified prompt)."""

    layer: int
    position: int
    feature: int
    value: float | None = None
    scale: float | None = None


class InterventionResult(NamedTuple):
    """Next-token distributions at the last position, before and after."""

    logits: torch.Tensor
    """``(vocab,)`` after the interventions."""
    original_logits: torch.Tensor
    """``(vocab,)`` on the unmodified prompt."""
    features: torch.Tensor
    """``(seq, n_layers, d_features)`` the feature activations of the intervened run."""

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    @property
    def original_probabilities(self) -> torch.Tensor:
        return torch.softmax(self.original_logits, -1)

    def top(self, tokenizer, n: int = 5) -> list[tuple[str, float, float]]:
        """The ``n`` most likely next tokens before or after: (token, probability before, probability after)."""
        before, after = self.original_probabilities, self.probabilities
        ids = torch.cat([before.topk(n).indices, after.topk(n).indices]).unique()
        ids = ids[after[ids].argsort(descending=True)]
        return [(tokenizer.decode([i]), float(before[i]), float(after[i])) for i in ids.tolist()]


@torch.no_grad()
def intervene(
    model: LoadedModel,
    clt: CrossLayerTranscoder,
    prompt: str | list[int] | torch.Tensor,
    interventions: list[Intervention] | list[tuple],
    *,
    freeze_attention: bool = True,
    hold_features: bool = False,
    local: LocalReplacement | None = None,
) -> InterventionResult:
    """Run ``prompt`` with ``interventions`` applied (see the module docstring) and return the next-token logits."""
    check_fits(model, clt)
    ids = prompt_ids(model, prompt)
    clt = clt.to(model.device).eval()
    local = (
        local if local is not None and torch.equal(local.prompt.ids, ids) else LocalReplacement(model, ids)
    )
    prompt_run = local.prompt
    seq, L, F = len(ids), clt.n_layers, clt.d_features
    original, errors = transcode(clt, prompt_run)  # (seq, n_layers, d_features), (seq, n_layers, d_model)
    changes: dict[int, list[tuple[int, int, float]]] = {}
    for item in interventions:
        item = Intervention(*item)
        if not (0 <= item.layer < L and 0 < item.position < seq and 0 <= item.feature < F):
            raise ValueError(
                f"{item} is outside the CLT and prompt: layer 0–{L - 1}, position 1–{seq - 1} (BOS is 0 and "
                f"cannot be intervened on), feature 0–{F - 1}."
            )
        if (item.value is None) == (item.scale is None):
            raise ValueError(f"{item}: give exactly one of value and scale.")
        value = (
            item.value
            if item.value is not None
            else item.scale * float(original[item.position, item.layer, item.feature])
        )
        changes.setdefault(item.layer, []).append((item.position, item.feature, value))
    features = original.clone()[None]  # (1, seq, n_layers, d_features)

    def mlp_fn(layer: int, resid: torch.Tensor) -> torch.Tensor:
        if not hold_features:
            features[:, 1:, layer] = clt.encode_layer(resid[:, 1:].float(), layer)
        for position, feature, value in changes.get(layer, []):
            features[:, position, layer, feature] = value
        out = clt.decode_layer(features, layer).float() + errors[None, :, layer]  # (1, seq, d_model)
        out[:, 0] = prompt_run.mlp_out[0, layer]  # BOS passes through
        return out

    _, final = local.run(mlp_fn=mlp_fn, frozen=freeze_attention)
    head = model.model.get_output_embeddings()
    logits = head(final[0, -1].to(head.weight.dtype)).float()
    return InterventionResult(logits, prompt_run.logits, features[0])
