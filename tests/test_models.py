"""Model registry, site lookup and the cached Hugging Face folder, on tiny models built here and in conftest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

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


WORDS = ["to", "be", "or", "not", "that", "is", "the", "question"]


def tied_llama():
    """A 2-layer Llama with a tied embedding and SmolLM2's rope θ of 100,000 (not the default 10,000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=100_000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        return LlamaForCausalLM(config).eval()


def word_tokenizer():
    """A fast tokenizer built from a ``tokenizers`` object: transformers 5 saves it as ``TokenizersBackend``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def reload(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_hf_folder_is_readable_by_older_transformers(tmp_path):
    """What transformers 4.57 (and so TransformerLens and circuit-tracer) needs, and the same logits on reload."""
    model, tokenizer = tied_llama(), word_tokenizer()
    directory = models.save_hf_folder(model, tokenizer, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100_000.0 and config["rope_parameters"]["rope_theta"] == 100_000.0
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        names = set(f.keys())
    # The tied embedding is stored once, under the name every reader looks for.
    assert "model.embed_tokens.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    again, again_tokenizer = reload(directory)
    ids = again_tokenizer("to be or not to be", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("to be or not to be", return_tensors="pt")["input_ids"].tolist()
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_hf_folder_keeps_an_untied_head_and_a_named_tokenizer_class(tmp_path, tiny_llama):
    directory = models.save_hf_folder(tiny_llama.model, tiny_llama.tokenizer, tmp_path / "hf")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(f.keys())
    assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    again, _ = reload(directory)
    ids = torch.tensor([[tiny_llama.bos_token_id, 464, 2068, 7586]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tiny_llama.model(ids).logits)


def test_cached_hf_folder_rebuilds_an_old_cache_once(tmp_path):
    built = []

    def build():
        built.append(1)
        return tied_llama(), word_tokenizer()

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a copy from before the cache had a version
    assert models.cached_hf_folder(folder, build) == folder
    assert len(built) == 1
    assert json.loads((folder / models.CACHE_MARKER).read_text()) == {"version": models.CACHE_VERSION}
    assert "architectures" in json.loads((folder / "config.json").read_text())
    assert not folder.with_name("model.tmp").exists()
    models.cached_hf_folder(folder, build)
    assert len(built) == 1
    (folder / models.CACHE_MARKER).write_text(json.dumps({"version": models.CACHE_VERSION - 1}))
    models.cached_hf_folder(folder, build)
    assert len(built) == 2
