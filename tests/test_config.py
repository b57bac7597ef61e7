"""Configuration dataclasses: validation messages and profiles as independent copies."""

from __future__ import annotations

import dataclasses

import pytest

from cltlab.config import (
    PROFILES,
    CLTConfig,
    DataConfig,
    HarvestConfig,
    LossConfig,
    OptimizerConfig,
    Profile,
    TrainConfig,
    TrainerConfig,
    TranscoderConfig,
    from_yaml,
    get_profile,
    to_yaml,
)


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
        (dict(n_layers=0, d_model=8, d_features=4), "n_layers and d_model must be positive"),
        (dict(n_layers=2, d_model=8, d_features=-4), "d_features must be positive, not -4"),
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
    assert ci.name == "ci" and ci.harvest.model == "tiny-gpt2" and ci.train.trainer.wandb is False
    ci.harvest.n_tokens = 1
    ci.train.trainer.max_steps = 1
    ci.eval.n_sequences = 1
    assert PROFILES["ci"].harvest.n_tokens == 4096
    assert PROFILES["ci"].train.trainer.max_steps == 60
    assert PROFILES["ci"].eval.n_sequences == 8
    assert get_profile("ci").harvest.n_tokens == 4096


def test_profile_to_dict_nests_every_section():
    d = get_profile("default").to_dict()
    assert d["name"] == "default"
    assert d["harvest"]["model"] == "smollm2-135m"
    assert d["train"]["trainer"]["precision"] == "bf16-mixed" and d["train"]["transcoder"]["d_features"] == 64
    assert d["train"]["loss"]["layer_weighting"] == "residual"
    assert d["eval"]["batch_size"] == 2


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(
        KeyError, match=r"Unknown profile 'nope'; choose one of \['ci', 'default', 'gpt2', 'gpu'\]"
    ):
        get_profile("nope")


def test_a_clt_config_is_the_transcoder_part_plus_the_shape():
    transcoder = TranscoderConfig(d_features=16, activation_kind="topk", k=4, cross_layer=False)
    config = CLTConfig(**dataclasses.asdict(transcoder), n_layers=3, d_model=8, layer_offset=2)
    assert isinstance(config, TranscoderConfig) and (config.d_features, config.k, config.layer_offset) == (
        16,
        4,
        2,
    )
    # What a CLT saves is the same flat record as before the split, so saved CLTs load unchanged.
    saved = dataclasses.asdict(config)
    assert set(saved) == {
        "d_features", "cross_layer", "activation_kind", "k", "threshold_init", "bandwidth",
        "n_layers", "d_model", "layer_offset",
    }  # fmt: skip
    assert CLTConfig.from_dict(saved) == config
    old = {**saved, "activation": saved.pop("activation_kind")}
    assert CLTConfig.from_dict(old) == config


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_train_config_from_its_nested_dict_and_from_the_flat_dict_of_old_checkpoints(profile):
    config = get_profile(profile).train
    nested = dataclasses.asdict(config)
    assert TrainConfig.from_dict(nested) == config
    flat = {name: value for part in nested.values() for name, value in part.items()}
    assert len(flat) == sum(len(part) for part in nested.values())  # no field name is in two parts
    flat["activation"] = flat.pop("activation_kind")  # the name before the rename
    assert TrainConfig.from_dict(flat) == config
    with pytest.raises(
        ValueError, match="TrainConfig has no field 'sparsity'; its parts are transcoder, loss"
    ):
        TrainConfig.from_dict({**flat, "sparsity": 1.0})


@pytest.mark.parametrize(
    ("part", "kwargs", "message"),
    [
        (
            TranscoderConfig,
            dict(activation_kind="topk", k=0),
            "k must be between 1 and d_features=512, not 0",
        ),
        (LossConfig, dict(decoding="csr"), "decoding must be auto, dense or sparse, not 'csr'"),
        (LossConfig, dict(sparsity_warmup=1.5), "sparsity_warmup in \\[0, 1\\]"),
        (OptimizerConfig, dict(lr=0.0), "lr must be positive, not 0.0"),
        (
            TrainerConfig,
            dict(max_steps=0),
            "max_steps, log_every, checkpoint_every and num_nodes must be positive",
        ),
        (DataConfig, dict(batch_size=0), "batch_size must be positive"),
    ],
)
def test_each_part_checks_its_own_fields(part, kwargs, message):
    with pytest.raises(ValueError, match=message):
        part(**kwargs)


def test_yaml_round_trip_and_errors_that_name_the_file(tmp_path):
    profile = get_profile("default")
    profile.harvest.layers = (1, 4)
    profile.train.trainer.devices = "0,1"
    path = profile.save(tmp_path / "p.yaml")
    assert Profile.load(path) == profile and from_yaml(TrainConfig, to_yaml(profile.train)) == profile.train
    (tmp_path / "bad.yaml").write_text("name: x\ntrain:\n  loss:\n    sparsity_coef: lots\n")
    with pytest.raises(ValueError, match=r"bad.yaml: .*train.loss.sparsity_coef.*lots"):
        Profile.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\ntrain:\n  optimizer:\n    learning_rate: 1\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml: Profile does not accept option 'train.optimizer.learning_rate'"
    ):
        Profile.load(tmp_path / "bad.yaml")


def test_replace_names_fields_alone_and_leaves_the_original():
    config = get_profile("ci").train
    changed = config.replace(max_steps=5, sparsity_coef=0.5, batch_size=64)
    assert (changed.trainer.max_steps, changed.loss.sparsity_coef, changed.data.batch_size) == (5, 0.5, 64)
    assert changed.transcoder == config.transcoder and changed.optimizer == config.optimizer
    assert config == get_profile("ci").train
    with pytest.raises(
        ValueError, match="max_steps, log_every, checkpoint_every and num_nodes must be positive"
    ):
        config.replace(max_steps=0)


def test_the_gpu_profile_is_sized_for_one_gpu_and_trains_live():
    gpu = get_profile("gpu")
    assert gpu.harvest.model == "smollm2-135m" and gpu.harvest.layers is None  # every layer
    assert gpu.train.transcoder.d_features >= 4096
    assert gpu.train.trainer.max_steps * gpu.train.data.batch_size >= 20_000_000
    assert gpu.train.data.live and gpu.train.trainer.precision == "bf16-mixed" and gpu.train.trainer.compile
    assert gpu.train.trainer.val_every > 0 and str(gpu.train.trainer.devices) == "1"


def test_the_default_profile_is_the_sweeps_chosen_point():
    # The README's sweep table names the point the default profile is; benchmarks/sweep.py defines it.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    default = get_profile("default").train
    assert sweep.POINTS["F64_S200_residual_e2e700x2_pool320_enc8"] is sweep.NOW
    mse_only = sweep.POINTS["F64_S200_residual"]
    assert sweep.NOW == {**mse_only, **sweep.E2E}  # the MSE-only point, then end to end
    assert default.replace(**{**sweep.BASE, **sweep.NOW}) == default
    assert default.replace(**sweep.BASE) != default  # the sweep's base is the old default
