"""Configuration dataclasses: validation messages and profiles as independent copies."""

from __future__ import annotations

import pytest

from cltlab.config import PROFILES, CLTConfig, HarvestConfig, get_profile


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_tokens=0), "n_tokens and batch_size must be positive and seq_len at least 2"),
        (dict(seq_len=1), "seq_len at least 2"),
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(dtype="int8"), "dtype must be float16, bfloat16 or float32, not 'int8'"),
        (dict(layers=(2, 2)), r"layers must be a range \(start, stop\) with 0 <= start < stop, not \(2, 2\)"),
        (dict(layers=(-1, 2)), "layers must be a range"),
        (dict(layers=(0, 1, 2)), "layers must be a range"),
    ],
)
def test_harvest_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HarvestConfig(**kwargs)


def test_harvest_config_layers_become_a_tuple():
    assert HarvestConfig(layers=[1, 3]).layers == (1, 3)
    assert HarvestConfig().layers is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_layers=0, d_model=8, d_features=4), "n_layers, d_model and d_features must be positive"),
        (dict(n_layers=2, d_model=8, d_features=-4), "must be positive"),
        (
            dict(n_layers=2, d_model=8, d_features=4, bandwidth=0.0),
            "bandwidth and threshold_init must be positive",
        ),
        (dict(n_layers=2, d_model=8, d_features=4, threshold_init=-1.0), "bandwidth and threshold_init"),
    ],
)
def test_clt_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLTConfig(**kwargs)


def test_profiles_are_data_and_get_profile_returns_a_copy():
    assert {"ci", "default", "gpt2"} <= set(PROFILES)
    ci = get_profile("ci")
    assert ci.name == "ci" and ci.harvest.model == "tiny-gpt2" and ci.train.wandb is False
    ci.harvest.n_tokens = 1
    ci.train.max_steps = 1
    ci.eval.n_sequences = 1
    assert PROFILES["ci"].harvest.n_tokens == 4096
    assert PROFILES["ci"].train.max_steps == 60
    assert PROFILES["ci"].eval.n_sequences == 8
    assert get_profile("ci").harvest.n_tokens == 4096


def test_profile_to_dict_nests_every_section():
    d = get_profile("default").to_dict()
    assert d["name"] == "default"
    assert d["harvest"]["model"] == "smollm2-135m"
    assert d["train"]["precision"] == "bf16-mixed"
    assert d["eval"]["batch_size"] == 8


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"Unknown profile 'nope'; choose one of \['ci', 'default', 'gpt2'\]"):
        get_profile("nope")
