"""Model registry and site lookup, on the seeded tiny-gpt2 and a tiny Llama built in conftest."""

from __future__ import annotations

import pytest
import torch

from cltlab import models
from cltlab.models import ARCHITECTURES, LoadedModel, gpt2_tokenizer, load_model


def test_gpt2_tokenizer_is_the_real_bpe():
    tokenizer = gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256


def test_tiny_gpt2_shape_and_state(tiny_gpt2):
    assert tiny_gpt2.name == "tiny-gpt2"
    assert tiny_gpt2.n_layers == 4
    assert tiny_gpt2.d_model == 64
    assert tiny_gpt2.bos_token_id == 50256
    assert tiny_gpt2.device == torch.device("cpu")
    assert not tiny_gpt2.model.training
    assert not any(p.requires_grad for p in tiny_gpt2.model.parameters())
    assert tiny_gpt2.sites == ARCHITECTURES["gpt2"]


def test_tiny_gpt2_is_seeded(tiny_gpt2):
    again = load_model("tiny-gpt2")
    a, b = tiny_gpt2.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_dtype():
    model = load_model("tiny-gpt2", dtype="bfloat16")
    assert next(model.model.parameters()).dtype == torch.bfloat16


def test_site_modules(tiny_gpt2, tiny_llama):
    block = tiny_gpt2.model.transformer.h[2]
    assert tiny_gpt2.blocks() is tiny_gpt2.model.transformer.h
    assert tiny_gpt2.pre_mlp_norm(2) is block.ln_2
    assert tiny_gpt2.mlp(2) is block.mlp
    assert tiny_llama.n_layers == 3 and tiny_llama.d_model == 32
    assert tiny_llama.pre_mlp_norm(1) is tiny_llama.model.model.layers[1].post_attention_layernorm
    assert tiny_llama.mlp(1) is tiny_llama.model.model.layers[1].mlp


def test_envoy_blocks_wrap_the_block_list(tiny_gpt2):
    blocks = tiny_gpt2.envoy_blocks()
    assert len(blocks) == 4


def test_unknown_architecture_is_a_clear_error(monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    def load_opt(dtype):
        config = OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
        return OPTForCausalLM(config).to(dtype), gpt2_tokenizer()

    monkeypatch.setitem(models.MODELS, "tiny-opt", load_opt)
    with pytest.raises(
        ValueError,
        match=r"Model 'tiny-opt' has architecture 'opt'.*add a row to cltlab\.models\.ARCHITECTURES",
    ):
        load_model("tiny-opt")


def test_tokenizer_without_bos_or_eos_is_a_clear_error(tiny_gpt2):
    class NoSpecialTokens:
        bos_token_id = None
        eos_token_id = None

    model = LoadedModel("bare", tiny_gpt2.model, NoSpecialTokens(), tiny_gpt2.sites)
    with pytest.raises(ValueError, match="Tokenizer of 'bare' has neither a BOS nor an EOS token"):
        _ = model.bos_token_id


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLTLAB_CACHE", str(tmp_path / "cache"))
    assert models.cache_dir() == tmp_path / "cache"
