"""TopK and BatchTopK activations, and converting a BatchTopK transcoder to JumpReLU thresholds."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_clt

from cltlab import CrossLayerTranscoder, train
from cltlab.activations import ACTIVATIONS, BatchTopK, TopK, batch_topk, batchtopk_thresholds, topk
from cltlab.config import CLTConfig, DataConfig, LossConfig, TrainConfig, TrainerConfig, TranscoderConfig
from cltlab.interop import export_circuit_tracer
from cltlab.jumprelu import JumpReLU


def test_topk_keeps_the_k_largest_of_each_token_and_layer():
    pre = torch.randn(6, 3, 20).abs() + 0.01  # all positive, so the ReLU keeps all k
    out = topk(pre, 4)
    assert ((out > 0).sum(-1) == 4).all()
    kth = pre.topk(4, dim=-1).values[..., -1:]
    assert torch.equal(out, pre * (pre >= kth))
    assert (topk(-pre, 4) == 0).all()  # negative winners are ReLU'd away


def test_batch_topk_shares_a_budget_of_k_per_token_across_the_batch():
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(16, 3, 20, generator=generator).abs() + 0.01
    pre[0, 0] += 5.0  # token 0 dominates layer 0
    out = batch_topk(pre, 2)
    assert ((out > 0).sum((0, 2)) == 2 * 16).all()  # k · n_tokens per layer
    assert (out[0, 0] > 0).sum() == 20 and (out[1:, 0] > 0).sum() == 12  # unequal per token
    for layer in range(3):
        kept = pre[:, layer][out[:, layer] > 0]
        dropped = pre[:, layer][out[:, layer] == 0]
        assert kept.min() >= dropped.max()
    torch.testing.assert_close(batch_topk(pre[:, 1], 2), out[:, 1])  # a 2-d input is one layer


def test_topk_gradients_reach_only_the_kept_entries():
    pre = torch.randn(8, 2, 10, requires_grad=True)
    out = batch_topk(pre, 3)
    out.sum().backward()
    assert torch.equal(pre.grad, (out > 0).float())


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_each_activation_name_builds_its_class_and_saves_the_same_tensors(name, tmp_path):
    clt = make_clt(2, 8, 16, activation_kind=name, k=3)
    assert type(clt.activation) is ACTIVATIONS[name]
    assert list(clt.state_dict()) == list(make_clt(2, 8, 16).state_dict())  # one file layout for every kind
    # Only JumpReLU trains its thresholds; a frozen one is what DDP needs of a parameter without a gradient.
    assert clt.activation.log_threshold.requires_grad == (name == "jumprelu")
    loaded = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"))
    assert type(loaded.activation) is ACTIVATIONS[name]
    torch.testing.assert_close(loaded.state_dict(), clt.state_dict())


def test_a_clt_saved_before_activation_kind_was_named_so_still_loads(tmp_path):
    directory = make_clt(2, 8, 16, activation_kind="topk", k=3).save(tmp_path / "clt")
    meta = json.loads((directory / "config.json").read_text())
    meta["config"]["activation"] = meta["config"].pop("activation_kind")  # the key older cltlab wrote
    (directory / "config.json").write_text(json.dumps(meta))
    loaded = CrossLayerTranscoder.load(directory)
    assert loaded.config.activation_kind == "topk" and type(loaded.activation) is TopK


@pytest.mark.parametrize("cls", [TopK, BatchTopK])
def test_topk_kinds_support_their_kept_entries_and_convert_to_a_jumprelu(cls):
    activation = cls((3, 20), k=4)
    pre = torch.randn(8, 3, 20)
    features = activation(pre)
    assert torch.equal(activation.gradient_support(pre, features), features > 0)
    assert activation.preact_loss(pre, torch.ones(3, 20)).item() == 0.0
    converted = activation.to_jumprelu([pre, pre * 2], bandwidth=0.05)
    theta = batchtopk_thresholds([pre, pre * 2], 4)
    assert isinstance(converted, JumpReLU) and converted.bandwidth == 0.05
    torch.testing.assert_close(converted.threshold, theta[:, None].expand(3, 20))


def test_batchtopk_of_one_layer_counts_every_leading_dimension_as_tokens():
    activation = BatchTopK((1, 20), k=2)
    pre = torch.randn(4, 5, 20)  # (batch, position, d_features) of one layer
    out = activation.forward_layer(pre, 0)
    torch.testing.assert_close(out, batch_topk(pre.reshape(20, 20), 2).view(4, 5, 20))


def test_topk_transcoder_has_l0_k_and_no_preactivation_loss():
    clt = make_clt(3, 8, 16, activation_kind="topk", k=5).train()
    x = torch.randn(32, 3, 8) * clt.input_scale + clt.input_mean
    out = clt.loss(x, torch.randn(32, 3, 8), sparsity_coef=1e-3, preact_coef=1.0)
    assert torch.allclose(out.l0, torch.full((3,), 5.0), atol=0.5)  # k, less the rare non-positive winners
    assert out.preact.item() == 0.0
    features = clt.encode(x)
    for layer in range(3):
        torch.testing.assert_close(clt.encode_layer(x[:, layer], layer), features[:, layer])


def test_batchtopk_converts_to_jumprelu_with_about_the_same_sparsity_and_reconstruction():
    clt = make_clt(3, 8, 64, activation_kind="batchtopk", k=6)
    batches = [torch.randn(256, 3, 8) * clt.input_scale + clt.input_mean for _ in range(4)]
    converted = clt.to_jumprelu(batches)
    assert converted.config.activation_kind == "jumprelu" and clt.config.activation_kind == "batchtopk"
    theta = batchtopk_thresholds((clt.preactivations(x) for x in batches), 6)
    assert torch.allclose(converted.activation.threshold, theta[:, None].expand(3, 64))
    held_out = torch.randn(512, 3, 8) * clt.input_scale + clt.input_mean
    with torch.no_grad():
        l0 = (converted.encode(held_out) > 0).sum(-1).float().mean(0)
        assert torch.allclose(l0, torch.full((3,), 6.0), rtol=0.25)
        before, after = clt(held_out).reconstruction, converted(held_out).reconstruction
        assert (after - before).pow(2).mean() < 0.1 * before.var()
    with pytest.raises(ValueError, match="this one is already jumprelu"):
        converted.to_jumprelu(batches)


def test_topk_transcoders_are_not_exported_to_circuit_tracer_unconverted(tmp_path):
    clt = make_clt(2, 8, 16, activation_kind="topk", k=2)
    with pytest.raises(ValueError, match="convert this topk one first with clt.to_jumprelu"):
        export_circuit_tracer(clt, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(activation_kind="relu"),
            "activation_kind must be one of jumprelu, topk, batchtopk, not 'relu'",
        ),
        (dict(activation_kind="topk", k=17), "k must be between 1 and d_features=16, not 17"),
        (dict(activation_kind="batchtopk", k=0), "k must be between 1 and d_features=16, not 0"),
    ],
)
def test_activation_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLTConfig(n_layers=2, d_model=8, d_features=16, **kwargs)


def test_training_a_batchtopk_clt_with_sparse_decoding(tmp_path, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=32, activation_kind="batchtopk", k=4),
        loss=LossConfig(decoding="auto"),
        trainer=TrainerConfig(max_steps=4, wandb=False, log_every=1, checkpoint_every=100),
        data=DataConfig(batch_size=64),
    )
    result = train(config, buffer_path, tmp_path / "run", enable_progress_bar=False)
    assert result.clt.config.activation_kind == "batchtopk" and result.clt.config.k == 4
    x = torch.randn(64, 4, 64) * result.clt.input_scale + result.clt.input_mean
    assert torch.allclose((result.clt.encode(x) > 0).sum(-1).float().mean(0), torch.full((4,), 4.0), atol=0.5)
