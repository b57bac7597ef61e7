"""Shared fixtures: tiny random models, one small harvested buffer, and random transcoders.

Everything is offline and tiny: ``tiny-gpt2`` (seeded random GPT-2, 4 layers, d_model 64, real GPT-2 tokenizer)
and a 3-layer Llama of width 32 built here. The buffer is harvested once per session.
"""

from __future__ import annotations

import pytest
import torch

from cltlab import harvest
from cltlab.config import HarvestConfig
from cltlab.models import ARCHITECTURES, LoadedModel, gpt2_tokenizer, load_model

# 500 rows from forward batches of 4 × 31 = 124 rows (the 5th batch stores only 4), two batches per shard:
# three shards of 248, 248 and 4 rows.
BUFFER_CONFIG = dict(
    model="tiny-gpt2", n_tokens=500, seq_len=32, batch_size=4, dtype="float32", shard_tokens=248
)
BUFFER_SHARD_ROWS = [248, 248, 4]


@pytest.fixture(scope="session")
def tiny_gpt2() -> LoadedModel:
    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = gpt2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
    model.eval().requires_grad_(False)
    return LoadedModel("tiny-llama", model, tokenizer, ARCHITECTURES["llama"])


@pytest.fixture(scope="session")
def harvest_config() -> HarvestConfig:
    return HarvestConfig(**BUFFER_CONFIG)


@pytest.fixture(scope="session")
def buffer_path(tmp_path_factory, tiny_gpt2, harvest_config):
    """A finished float32 harvest folder of all 4 layers of tiny-gpt2: 500 rows in 3 shards, sequences of 32."""
    path = tmp_path_factory.mktemp("buffer") / "acts"
    result = harvest(harvest_config, path, model=tiny_gpt2, device="cpu", progress=False)
    assert result.path == path and result.n_tokens == 500 and not result.reused and result.complete
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "shard-00000.h5",
        "shard-00001.h5",
        "shard-00002.h5",
    ]
    return path
