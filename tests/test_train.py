"""Training: a few Lightning steps on the session buffer write the CLT, metrics and checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import itertools

import lightning as L
import pytest
import torch
from helpers import held_out_metrics

from cltlab import CrossLayerTranscoder, DiscBuffer, plots, train
from cltlab.config import (
    DataConfig,
    LossConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    TranscoderConfig,
)
from cltlab.data import EpochSampler, ThreadedBatches
from cltlab.training import CLTModule, lr_factor

STEPS = 10


def read_metrics(log_dir) -> list[dict[str, str]]:
    """The raw rows of the newest version's metrics.csv."""
    newest = max(log_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(newest, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=32),
        optimizer=OptimizerConfig(lr=1e-3),
        trainer=TrainerConfig(max_steps=STEPS, wandb=False, log_every=1, checkpoint_every=5),
        data=DataConfig(batch_size=128),
    )
    run_dir = tmp_path_factory.mktemp("run")
    result = train(config, buffer_path, run_dir, enable_progress_bar=False)
    return config, run_dir, result


def test_train_writes_the_clt(trained, buffer_path):
    _, run_dir, result = trained
    assert result.clt_dir == run_dir / "clt"
    assert (run_dir / "clt" / "model.safetensors").exists() and (run_dir / "clt" / "config.json").exists()
    clt = result.clt
    assert isinstance(clt, CrossLayerTranscoder) and not clt.training
    assert (clt.n_layers, clt.d_model, clt.d_features) == (4, 64, 32)
    assert clt.config.cross_layer and clt.config.layer_offset == 0
    loaded = CrossLayerTranscoder.load(result.clt_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(clt.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    # The harvest's normalization statistics travel with the CLT.
    stats = DiscBuffer(buffer_path, batch_size=128).stats
    assert torch.equal(loaded.input_mean, stats.input_mean) and torch.equal(
        loaded.output_scale, stats.output_scale
    )
    # The weights moved: every parameter changed between the step-5 checkpoint and the end (step 10).
    halfway = next(result.checkpoint_dir.glob("*step=5*"))
    earlier = CLTModule.load_from_checkpoint(halfway, map_location="cpu", weights_only=True).clt.float()
    for (name, before), after in zip(earlier.named_parameters(), clt.parameters(), strict=True):
        assert not torch.equal(before, after), f"{name} did not change between steps 5 and 10"


def test_train_logs_metrics_to_csv(trained):
    _, run_dir, result = trained
    assert result.log_dir == run_dir / "logs"
    rows = read_metrics(result.log_dir)
    columns = set(rows[0])
    expected = {"loss", "mse", "sparsity", "preact", "lambda", "dead_frac", "nmse", "l0", "step"}
    expected |= {f"nmse/layer_{i}" for i in range(4)} | {f"l0/layer_{i}" for i in range(4)}
    assert expected <= columns
    logged = [r for r in rows if r["loss"]]
    assert len(logged) == STEPS
    assert [int(r["step"]) for r in logged] == list(range(STEPS))
    for r in logged:
        assert 0.0 <= float(r["dead_frac"]) <= 1.0
        assert float(r["nmse"]) == pytest.approx(
            sum(float(r[f"nmse/layer_{i}"]) for i in range(4)) / 4, rel=1e-5
        )
        assert float(r["loss"]) > 0
    # λ ramps linearly from 0 over the first 80% of steps.
    assert float(logged[0]["lambda"]) == 0.0
    assert float(logged[4]["lambda"]) == pytest.approx(2e-4 * 4 / (0.8 * STEPS))


def test_train_writes_checkpoints(trained):
    _, _, result = trained
    names = sorted(p.name for p in result.checkpoint_dir.iterdir())
    assert "last.ckpt" in names
    assert any("step=5" in n for n in names) and any("step=10" in n for n in names)
    module = CLTModule.load_from_checkpoint(
        result.checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert torch.equal(module.clt.W_enc.float(), result.clt.W_enc)


def test_per_layer_transcoder_training(tmp_path, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16, cross_layer=False),
        trainer=TrainerConfig(max_steps=3, wandb=False, log_every=1, checkpoint_every=100),
        data=DataConfig(batch_size=128),
    )
    result = train(config, buffer_path, tmp_path / "plt", enable_progress_bar=False)
    assert not result.clt.config.cross_layer
    assert [tuple(W.shape) for W in result.clt.W_dec] == [(16, 1, 64)] * 4
    assert len([r for r in read_metrics(result.log_dir) if r["loss"]]) == 3


def test_residual_layer_weighting_reaches_the_loss(tmp_path, buffer_path, monkeypatch):
    seen = []
    loss = CrossLayerTranscoder.loss

    def recording(self, *args, **kwargs):
        seen.append(kwargs["layer_weights"])
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(CrossLayerTranscoder, "loss", recording)
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        loss=LossConfig(layer_weighting="residual"),
        trainer=TrainerConfig(max_steps=2, wandb=False, log_every=1, checkpoint_every=100),
        data=DataConfig(batch_size=128),
    )
    result = train(config, buffer_path, tmp_path / "weighted", enable_progress_bar=False)
    expected = result.clt.output_scale.flatten() / result.clt.input_scale.flatten()
    assert len(seen) == 2
    for weights in seen:  # from the harvest's normalization, mean 1
        assert torch.allclose(weights, expected / expected.mean())
        assert not torch.allclose(weights, torch.ones_like(weights))


def test_train_refuses_a_buffer_smaller_than_a_batch(tmp_path, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=8),
        trainer=TrainerConfig(max_steps=1, wandb=False),
        data=DataConfig(batch_size=4096),
    )
    with pytest.raises(ValueError, match="holds 500 tokens, fewer than one batch of 4096"):
        train(config, buffer_path, tmp_path / "run")


def test_resume_continues_from_the_last_checkpoint(tmp_path, buffer_path):
    run_dir = tmp_path / "run"
    first = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=4, wandb=False, log_every=1, checkpoint_every=2),
        data=DataConfig(batch_size=128),
    )
    train(first, buffer_path, run_dir, enable_progress_bar=False)
    longer = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=6, wandb=False, log_every=1, checkpoint_every=2),
        data=DataConfig(batch_size=128),
    )
    result = train(longer, buffer_path, run_dir, resume=True, enable_progress_bar=False)
    steps = [int(r["step"]) for r in read_metrics(result.log_dir) if r["loss"]]
    assert steps == [4, 5]  # the second call went on from step 4 rather than starting over
    # ...and the curves the plots read still hold steps 0-3 from the first call.
    assert [step for step, _ in plots.read_metrics(result.log_dir)["loss"]] == list(range(6))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, buffer_path, monkeypatch):
    from cltlab.clt import CrossLayerTranscoder as CLT

    loss, calls = CLT.loss, []

    def nan_from_step_6(self, *args, **kwargs):  # steps 0-5 train normally, step 6 returns a NaN loss
        calls.append(1)
        out = loss(self, *args, **kwargs)
        return out._replace(total=out.total * float("nan")) if len(calls) > 6 else out

    monkeypatch.setattr(CLT, "loss", nan_from_step_6)
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=20, wandb=False, log_every=1, checkpoint_every=5),
        data=DataConfig(batch_size=128),
    )
    with pytest.raises(FloatingPointError, match="Loss became nan at step 6; lower the learning rate"):
        train(config, buffer_path, tmp_path / "run", enable_progress_bar=False)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert any("step=5" in name for name in saved)  # the last good checkpoint is kept
    assert not any("step=10" in name for name in saved)


class InfGradientAt(L.Callback):
    """Makes one entry of ``W_enc``'s gradient infinite (or ``value``) at ``step``, after a finite loss's backward
    pass."""

    def __init__(self, step: int, value: float = float("inf")):
        self.step, self.value = step, value

    def on_after_backward(self, trainer, module) -> None:
        if trainer.global_step == self.step:
            module.clt.W_enc.grad[0, 0, 0] = self.value


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_gradient_stops_training_before_a_checkpoint_holds_it(tmp_path, buffer_path, value):
    # Adam turns an inf gradient into NaN weights; unchecked, step 9's update was saved as the step=10 checkpoint
    # (and as last.ckpt) before the next step's loss came out NaN.
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=20, wandb=False, log_every=1, checkpoint_every=5),
        data=DataConfig(batch_size=128),
    )
    expected = (
        "The gradient of W_enc became non-finite at step 9 while the loss was finite; lower the learning rate "
        "(no step was taken; the last checkpoint is kept)."
    )
    with pytest.raises(FloatingPointError) as error:
        train(
            config,
            buffer_path,
            tmp_path / "run",
            callbacks=[InfGradientAt(9, value)],
            enable_progress_bar=False,
        )
    assert str(error.value) == expected
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["epoch=0-step=5.ckpt", "last.ckpt"]
    for name in saved:
        checkpoint = torch.load(
            tmp_path / "run" / "checkpoints" / name, map_location="cpu", weights_only=True
        )
        assert checkpoint["global_step"] == 5
        assert all(value.isfinite().all() for value in checkpoint["state_dict"].values()), name


class RunsCode:
    """A pickled object that runs code when it is unpickled, as a checkpoint from an untrusted source could."""

    ran: list[str] = []

    def __reduce__(self):
        return RunsCode.ran.append, ("code ran",)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, buffer_path, monkeypatch):
    import pickle

    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=2, wandb=False, checkpoint_every=1),
        data=DataConfig(batch_size=128),
    )
    run_dir = tmp_path / "run"
    train(config, buffer_path, run_dir, enable_progress_bar=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["payload"] = RunsCode()
    torch.save(checkpoint, last)
    # torch.load defaults to weights_only=True, but a user's environment can turn the default off; cltlab asks for
    # it explicitly, which the environment cannot override.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(RunsCode, "ran", [])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(
            dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, max_steps=3)),
            buffer_path,
            run_dir,
            resume=True,
            enable_progress_bar=False,
        )
    assert RunsCode.ran == []


def test_learning_rate_schedule_warms_up_holds_and_decays():
    factors = [lr_factor(step, max_steps=10, warmup_steps=4, decay=0.2) for step in range(11)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    assert [lr_factor(s, max_steps=5, warmup_steps=0, decay=0.0) for s in range(5)] == [1.0] * 5


class StopAfter(L.Callback):
    """Ends fit after ``step`` optimizer steps, as if the job had been cut off there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_resumed_run_has_the_losses_and_weights_of_an_uninterrupted_one(tmp_path, buffer_path):
    # 9 steps of 64 rows each cross the buffer's epoch of 8 batches, so the resumed run must also pick up the
    # second epoch's order where the first run would have.
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        optimizer=OptimizerConfig(lr=3e-3),
        trainer=TrainerConfig(max_steps=9, wandb=False, log_every=1, checkpoint_every=4),
        data=DataConfig(batch_size=64),
    )
    whole = train(config, buffer_path, tmp_path / "whole", enable_progress_bar=False)
    train(config, buffer_path, tmp_path / "cut", callbacks=[StopAfter(4)], enable_progress_bar=False)
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").exists()
    resumed = train(config, buffer_path, tmp_path / "cut", resume=True, enable_progress_bar=False)

    def losses(result) -> dict[int, str]:
        return {int(r["step"]): r["loss"] for r in read_metrics(result.log_dir) if r["loss"]}

    assert sorted(losses(resumed)) == list(range(4, 9))
    assert {step: loss for step, loss in losses(whole).items() if step >= 4} == losses(resumed)
    for name, value in whole.clt.state_dict().items():
        assert torch.equal(value, resumed.clt.state_dict()[name]), name


def test_compiled_training_matches_eager_training(tmp_path, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        optimizer=OptimizerConfig(lr=3e-3),
        trainer=TrainerConfig(max_steps=3, wandb=False, log_every=1, checkpoint_every=100),
        data=DataConfig(batch_size=64),
    )
    eager = train(config, buffer_path, tmp_path / "eager", enable_progress_bar=False)
    compiled_config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, compile=True))
    compiled = train(compiled_config, buffer_path, tmp_path / "compiled", enable_progress_bar=False)
    eager_losses = [float(r["loss"]) for r in read_metrics(eager.log_dir) if r["loss"]]
    compiled_losses = [float(r["loss"]) for r in read_metrics(compiled.log_dir) if r["loss"]]
    assert len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    torch.testing.assert_close(compiled.clt.W_enc, eager.clt.W_enc, rtol=1e-3, atol=1e-5)


def test_threaded_batches_are_the_buffers_batches_in_sampler_order(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=64)
    sampler = EpochSampler(len(buffer), seed=3, start=2)
    n = len(buffer)
    order = list(itertools.islice(iter(sampler), 2 * n + 2))  # crosses two epoch boundaries
    assert sorted(order[n - 2 : 2 * n - 2]) == list(range(n))  # the second epoch: every batch once
    assert order[: n - 2] == list(itertools.islice(EpochSampler(n, seed=3), 2, n))  # start skips 2
    batches = ThreadedBatches(buffer, sampler, threads=3, reserve=2)
    recent = []
    for index, batch in zip(order, batches, strict=False):
        expected = buffer[index]
        assert torch.equal(batch.resid_mid, expected.resid_mid) and torch.equal(
            batch.mlp_out, expected.mlp_out
        )
        recent = [*recent[-1:], (index, batch)]  # the last `reserve` batches stay intact while reads go on
        for held_index, held in recent:
            assert torch.equal(held.mlp_out, buffer[held_index].mlp_out)
    with pytest.raises(ValueError, match="threads and reserve must be at least 1, not 0 and 2"):
        ThreadedBatches(buffer, sampler, threads=0, reserve=2)


def test_training_from_reader_threads_matches_the_dataloader(tmp_path, buffer_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        optimizer=OptimizerConfig(lr=3e-3),
        trainer=TrainerConfig(max_steps=4, wandb=False, log_every=1, checkpoint_every=100),
        data=DataConfig(batch_size=64),
    )
    loader = train(config, buffer_path, tmp_path / "loader", enable_progress_bar=False)
    threads = train(
        dataclasses.replace(config, data=dataclasses.replace(config.data, reader_threads=2)),
        buffer_path,
        tmp_path / "threads",
        enable_progress_bar=False,
    )
    assert [r["loss"] for r in read_metrics(threads.log_dir) if r["loss"]] == [
        r["loss"] for r in read_metrics(loader.log_dir) if r["loss"]
    ]


def test_a_checkpoint_from_before_the_nested_config_still_loads(trained, tmp_path):
    config, _, result = trained
    checkpoint = torch.load(result.checkpoint_dir / "last.ckpt", weights_only=True)
    nested = checkpoint["hyper_parameters"]["train_config"]
    flat = {name: value for part in nested.values() for name, value in part.items()}
    checkpoint["hyper_parameters"]["train_config"] = {**flat, "activation": flat.pop("activation_kind")}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    module = CLTModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=True)
    assert module.cfg == config
    assert torch.equal(module.clt.W_enc.float(), result.clt.W_enc)


def test_the_trainer_has_a_text_bar_under_cltlab_run_and_no_cloud_logger_tip(tmp_path, monkeypatch, caplog):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from cltlab.training import make_trainer

    config = TrainerConfig(max_steps=3, wandb=False)
    with caplog.at_level("INFO"):
        trainer = make_trainer(config, tmp_path / "a")
    assert not any("Tip" in record.getMessage() for record in caplog.records)
    assert any("GPU available" in record.getMessage() for record in caplog.records)  # the rest still logs
    monkeypatch.setenv("CLTLAB_PROGRESS", "text")
    trainer = make_trainer(config, tmp_path / "b")
    assert type(trainer.progress_bar_callback) is TQDMProgressBar


def test_validation_logs_the_held_out_metrics_that_evaluate_gives(tmp_path, buffer_path, tiny_gpt2):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=32),
        optimizer=OptimizerConfig(lr=1e-3),
        trainer=TrainerConfig(
            max_steps=7, wandb=False, log_every=1, checkpoint_every=7, val_every=3, val_sequences=2
        ),
        data=DataConfig(batch_size=128),
    )
    result = train(config, buffer_path, tmp_path, enable_progress_bar=False)
    validated = [r for r in read_metrics(result.log_dir) if r.get("val/kl")]
    assert [int(r["step"]) for r in validated] == [3, 6, 7]  # every 3 steps, and after the last
    assert len({r["val/kl"] for r in validated}) == 3  # measured on the weights of each step
    # The last one measured the trained CLT: the model, corpus and length come from the harvest's manifest.
    metrics = held_out_metrics(tiny_gpt2, result.clt)
    last = {key: float(value) for key, value in validated[-1].items() if key.startswith("val/") and value}
    assert last["val/kl"] == pytest.approx(metrics.kl, rel=1e-4)
    assert last["val/top1"] == pytest.approx(metrics.top1_agreement)
    assert last["val/ce_recovered"] == pytest.approx(metrics.ce_recovered, rel=1e-4)
    assert last["val/l0"] == pytest.approx(metrics.mean_l0, rel=1e-5)
    for i in range(4):
        assert last[f"val/nmse/layer_{i}"] == pytest.approx(metrics.nmse[i], rel=1e-4)
        assert last[f"val/l0/layer_{i}"] == pytest.approx(metrics.l0[i], rel=1e-5)
    assert result.clt.training is False and last["val/seconds"] > 0
    fig = plots.training_curves(result.log_dir)
    assert {"val/nmse", "val/l0", "val/kl", "val/top1", "val/ce_recovered"} <= {t.name for t in fig.data}


def test_validation_needs_a_harvest_folder_and_no_fsdp(buffer_path):
    from cltlab.training import validation_for

    with pytest.raises(ValueError, match="val_every needs to know the model and corpus"):
        validation_for(object(), TrainerConfig(val_every=5))
    with pytest.raises(ValueError, match="FSDP"):
        validation_for(DiscBuffer(buffer_path, batch_size=100), TrainerConfig(val_every=5, strategy="fsdp"))
    with pytest.raises(ValueError, match="val_every must be 0"):
        TrainerConfig(val_every=-1)


def test_live_training_harvests_its_rows_as_the_folder_was_harvested(tmp_path, buffer_path):
    from cltlab.data import LiveActivations

    data = DataConfig(batch_size=64, live=True, shuffle_rows=200)
    live = LiveActivations.like(buffer_path, data, seed=0)
    try:
        assert (live.n_layers, live.d_model, live.layer_start, live.dtype) == (4, 64, 0, "float32")
        assert live.origin == {"model": "tiny-gpt2", "corpus": "shakespeare", "seq_len": 32}
        batch = next(iter(live))
        assert batch.resid_mid.shape == (64, 4, 64) and batch.mlp_out.abs().sum() > 0
        expected_stats = live.stats
    finally:
        live.close()
    # The buffer's own statistics differ (they are of its 500 rows): the CLT is normalized by the live pool's.
    assert not torch.equal(
        expected_stats.input_scale, DiscBuffer(buffer_path, batch_size=64).stats.input_scale
    )
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=4, wandb=False, log_every=1, checkpoint_every=4),
        data=data,
    )
    result = train(config, buffer_path, tmp_path, enable_progress_bar=False)
    assert len(read_metrics(result.log_dir)) == 4
    torch.testing.assert_close(result.clt.input_scale, expected_stats.input_scale)  # same seed, same pool
    torch.testing.assert_close(result.clt.output_mean, expected_stats.output_mean)
    with pytest.raises(ValueError, match="data.live trains on one device"):
        train(config.replace(devices=2), buffer_path, tmp_path / "two", enable_progress_bar=False)
