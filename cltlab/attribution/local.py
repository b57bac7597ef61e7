"""The local replacement model of one prompt: the language model made linear in its residual stream.

Following Ameisen et al. (2025) and circuit-tracer, for one prompt we freeze

- every attention pattern (the softmax output) at its value on the prompt,
- every normalization denominator (LayerNorm's σ, RMSNorm's rms) at its value on the prompt,
- every MLP's output: it becomes whatever the caller supplies — the CLT's reconstruction from held feature
  activations plus the constant error term ``mlp_out − reconstruction``, or a tensor that autograd tracks.

What remains (embeddings, value and output projections, residual additions, frozen norms and patterns) is affine
in the token embeddings and MLP outputs, so a backward pass from a target (a feature's encoder direction at
``resid_mid``, or a logit direction after the final norm) gives exact direct effects.

The patterns are frozen through transformers' public ``AttentionInterface``: a registered attention function that
records the pattern on the prompt and replays it afterwards (for every architecture that dispatches attention
through the interface: GPT-2, Llama, Mistral, Qwen, …). The norms are frozen by forward hooks, for the norm
classes in ``NORMS``. We use plain PyTorch hooks rather than an nnsight trace here because the attribution needs
autograd leaves in place of the MLP outputs and many backward passes over one retained graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..clt import CrossLayerTranscoder
from ..models import LoadedModel

ATTENTION = "cltlab_frozen"
"""The name cltlab's attention function is registered under in transformers' ``AttentionInterface``."""


@dataclass(frozen=True)
class NormKind:
    """How one normalization class computes its output: ``(x − mean?) / sqrt(mean(·²) + eps) · (w + offset) + b``."""

    centered: bool
    """Subtracts the mean over d_model first (LayerNorm) or not (RMSNorm)."""
    weight_offset: float = 0.0
    """Added to the weight before scaling (Gemma's RMSNorm multiplies by ``1 + weight``)."""


NORMS: dict[str, NormKind] = {
    "LayerNorm": NormKind(centered=True),
    "OlmoLayerNorm": NormKind(centered=True),
    "LlamaRMSNorm": NormKind(centered=False),
    "MistralRMSNorm": NormKind(centered=False),
    "Qwen2RMSNorm": NormKind(centered=False),
    "Qwen3RMSNorm": NormKind(centered=False),
    "GemmaRMSNorm": NormKind(centered=False, weight_offset=1.0),
}
"""Normalization classes the local replacement model can freeze, by class name. A new architecture's norm is one
more row; a model with a norm class not listed here is refused with a message naming it."""


@dataclass
class _Frozen:
    """What one prompt froze: attention patterns and norm denominators, by module."""

    record: bool = True
    patterns: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    """``(1, n_heads, seq, seq)`` per attention module."""
    scales: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    """``(1, seq, 1)`` per norm module."""


_STATE: contextvars.ContextVar[_Frozen | None] = contextvars.ContextVar("cltlab_frozen", default=None)


def _frozen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with the pattern recorded on the prompt, then replayed (inputs ``(batch, heads, seq, d_head)``)."""
    state = _STATE.get()
    if state is None:
        raise RuntimeError(
            f"The {ATTENTION!r} attention implementation only runs inside cltlab's local replacement model."
        )
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"cltlab cannot freeze attention with {name!r} (used by {type(module).__name__})."
            )
    repeat = query.shape[1] // value.shape[1]  # grouped-query attention: key/value heads are shared
    value = value.repeat_interleave(repeat, dim=1)
    if state.record:
        key = key.repeat_interleave(repeat, dim=1)
        scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        state.patterns[module] = torch.softmax(scores.float(), dim=-1).detach()
    pattern = state.patterns[module].to(value.dtype)  # (1, heads, seq, seq), broadcast over the batch
    return (pattern @ value).transpose(1, 2), pattern


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, _frozen_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)  # the additive mask the recording pass needs


def _norm_kind(module: nn.Module) -> NormKind | None:
    name = type(module).__name__
    if name in NORMS:
        return NORMS[name]
    if "Norm" in name and not list(module.children()) and name not in ("GroupNorm", "BatchNorm1d"):
        raise ValueError(
            f"cltlab does not know how to freeze the normalization {name!r}; add a row to "
            f"cltlab.attribution.local.NORMS (known: {sorted(NORMS)})."
        )
    return None


def _norm_hook(module: nn.Module, args, output):
    """Forward hook: the norm with its denominator recorded on the prompt, then held."""
    state = _STATE.get()
    kind = NORMS[type(module).__name__]
    x = args[0].float()
    centered = x - x.mean(-1, keepdim=True) if kind.centered else x
    if state.record:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-5))
        state.scales[module] = (centered.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    out = centered / state.scales[module]
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        out = out * (weight.float() + kind.weight_offset)
    if bias is not None:
        out = out + bias.float()
    tolerance = (
        1e-4 if output.dtype == torch.float32 else 3e-2
    )  # half precision rounds the module's own output
    if state.record and not torch.allclose(
        out, output.float(), rtol=tolerance, atol=tolerance * float(output.abs().max())
    ):
        raise ValueError(
            f"cltlab's frozen {type(module).__name__} does not reproduce the module's output; fix its row in "
            "cltlab.attribution.local.NORMS."
        )
    return out.to(output.dtype)


@dataclass
class PromptRun:
    """The original model on one prompt (batch of one), as the local replacement model sees it."""

    ids: torch.Tensor
    """``(seq,)`` token ids, BOS first."""
    resid_mid: torch.Tensor
    """``(seq, n_layers, d_model)`` the input of every MLP's pre-norm."""
    mlp_out: torch.Tensor
    """``(seq, n_layers, d_model)`` every MLP's output."""
    embeddings: torch.Tensor
    """``(seq, d_model)`` the token embeddings (the input embedding module's output)."""
    final: torch.Tensor
    """``(seq, d_model)`` the residual stream after the final norm (what the unembedding reads)."""
    logits: torch.Tensor
    """``(vocab,)`` next-token logits at the last position."""


class LocalReplacement:
    """A language model frozen on one prompt, to run again with other embeddings and MLP outputs.

    ``LocalReplacement(model, ids)`` runs the prompt once, recording attention patterns and norm denominators;
    ``run`` then evaluates the frozen (affine) model for a batch of inputs. Attributes: ``model``, ``prompt``
    (a ``PromptRun``).
    """

    def __init__(self, model: LoadedModel, ids: torch.Tensor):
        self.model = model
        self._frozen = _Frozen()
        self.norms = [m for m in model.model.modules() if _norm_kind(m) is not None]
        _register_attention()
        resid, mlp, embed = {}, {}, {}
        with torch.no_grad(), self._hooks(record=True, resid=resid, mlp_fn=None, mlp_seen=mlp, embed=embed):
            final = self._base(ids[None])
        L = model.n_layers
        self.prompt = PromptRun(
            ids=ids,
            resid_mid=torch.stack([resid[i][0] for i in range(L)], 1).float(),
            mlp_out=torch.stack([mlp[i][0] for i in range(L)], 1).float(),
            embeddings=embed["out"][0].float(),
            final=final[0].float(),
            logits=model.model.get_output_embeddings()(final[0, -1]).float(),
        )

    # ------------------------------------------------------------------------------------------- running

    def run(
        self,
        *,
        batch: int = 1,
        embeddings: torch.Tensor | None = None,
        mlp_fn: Callable[[int, torch.Tensor], torch.Tensor],
        frozen: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run the model on the prompt (``batch`` copies) with every MLP's output given by ``mlp_fn``.

        ``mlp_fn(layer, resid_mid)`` receives the layer's ``resid_mid`` ``(batch, seq, d_model)`` and returns the
        MLP output to use. ``embeddings`` ``(batch, seq, d_model)`` replace the token embeddings. ``frozen``:
        attention patterns and norm denominators held at their values on the prompt (the local replacement
        model), or computed afresh. Returns ``resid_mid`` per layer ``(batch, seq, d_model)`` and the residual
        stream after the final norm ``(batch, seq, d_model)``. Gradients flow when the caller enables them.
        """
        resid: dict[int, torch.Tensor] = {}
        with self._hooks(record=False, resid=resid, mlp_fn=mlp_fn, embed=embeddings, frozen=frozen):
            final = self._base(self.prompt.ids[None].expand(batch, -1))
        return [resid[i] for i in range(self.model.n_layers)], final

    def _base(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.base_model(
            input_ids=ids.to(self.model.device), use_cache=False
        ).last_hidden_state

    @contextlib.contextmanager
    def _hooks(
        self,
        *,
        record: bool,
        resid: dict,
        mlp_fn,
        mlp_seen: dict | None = None,
        embed=None,
        frozen: bool = True,
    ) -> Iterator[None]:
        model = self.model
        config = model.model.config
        handles = []

        def keep_resid(layer):
            return lambda module, args: resid.__setitem__(layer, args[0])

        def keep_mlp(layer):
            return lambda module, args, output: mlp_seen.__setitem__(layer, output.detach())

        def replace_embed(module, args, output):
            if record:
                embed["out"] = output.detach()
                return output
            return embed.to(output.dtype) if embed is not None else output

        for layer in range(model.n_layers):
            handles.append(model.pre_mlp_norm(layer).register_forward_pre_hook(keep_resid(layer)))
            if mlp_fn is None:
                handles.append(model.mlp(layer).register_forward_hook(keep_mlp(layer)))
        handles.append(model.model.get_input_embeddings().register_forward_hook(replace_embed))
        # MLPs are swapped out rather than hooked, so that they are not computed at all.
        mlps = [model.mlp(layer) for layer in range(model.n_layers)]
        if mlp_fn is not None:
            for layer in range(model.n_layers):
                setattr(model.blocks()[layer], model.sites.mlp, _Replaced(layer, mlp_fn, resid))
        previous = config._attn_implementation
        token = None
        if frozen:
            self._frozen.record = record
            handles += [norm.register_forward_hook(_norm_hook) for norm in self.norms]
            config._attn_implementation = ATTENTION
            token = _STATE.set(self._frozen)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, mlp in enumerate(mlps):
                setattr(model.blocks()[layer], model.sites.mlp, mlp)
            config._attn_implementation = previous
            if token is not None:
                _STATE.reset(token)


class _Replaced(nn.Module):
    """Stands in for one MLP while the local model runs: returns ``mlp_fn(layer, resid_mid)``."""

    def __init__(self, layer: int, mlp_fn: Callable, resid: dict):
        super().__init__()
        self.layer, self.mlp_fn, self.resid = layer, mlp_fn, resid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_fn(self.layer, self.resid[self.layer]).to(x.dtype)


@torch.no_grad()
def transcode(clt: CrossLayerTranscoder, prompt: PromptRun) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLT on the prompt: features ``(seq, n_layers, d_features)`` and error vectors ``mlp_out −
    reconstruction`` ``(seq, n_layers, d_model)``, both zero at BOS (whose MLP output stays a constant of the local
    model, as in circuit-tracer)."""
    device = clt.W_enc.device
    features = clt.encode(prompt.resid_mid.to(device)).float()
    features[0] = 0
    errors = prompt.mlp_out.to(device) - clt.decode(features).float()
    errors[0] = 0
    return features, errors


def prompt_ids(model: LoadedModel, prompt: str | list[int] | torch.Tensor) -> torch.Tensor:
    """Token ids ``(seq,)`` of a prompt with BOS first (added when missing), checked against the model's context."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("The prompt is empty; give some text to attribute.")
        ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = torch.as_tensor(prompt).flatten().tolist()
    if not ids or ids == [model.bos_token_id]:
        raise ValueError("The prompt is empty; give some text to attribute.")
    if ids[0] != model.bos_token_id:
        ids = [model.bos_token_id, *ids]
    context = getattr(model.model.config, "max_position_embeddings", None)
    if context is not None and len(ids) > context:
        raise ValueError(
            f"The prompt has {len(ids)} tokens with BOS but {model.name!r} reads at most {context}; shorten it."
        )
    return torch.tensor(ids, dtype=torch.long)


def check_fits(model: LoadedModel, clt: CrossLayerTranscoder) -> None:
    """Refuse a CLT that does not cover every layer of the model at its width."""
    if (clt.d_model, clt.n_layers, clt.config.layer_offset) != (model.d_model, model.n_layers, 0):
        raise ValueError(
            f"The CLT covers layers {clt.config.layer_offset}–{clt.config.layer_offset + clt.n_layers - 1} at "
            f"d_model {clt.d_model}, but attribution needs every layer of {model.name!r} (0–{model.n_layers - 1}, "
            f"d_model {model.d_model}); train the CLT on all layers of this model."
        )
