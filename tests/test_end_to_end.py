"""End-to-end fine-tuning: gradients through the replacement model, its loss, and the stage after train()."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from helpers import held_out_metrics, hooked_sites, random_ids
from test_replacement import clt_for, hooked_logits

from cltlab import CrossLayerTranscoder, ReplacementModel, finetune, load_model, plots, train
from cltlab.config import (
    DataConfig,
    FinetuneConfig,
    OptimizerConfig,
    TrainConfig,
    TrainerConfig,
    TranscoderConfig,
)
from cltlab.corpus import token_sequences
from cltlab.end_to_end import (
    FinetuneModule,
    TrainingText,
    _check_pool_memory,
    _stage_config,
    kl_divergence,
)
from cltlab.training import CLTModule, check_finetune


def kl_to_original(model, clt, ids: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ replacement) per predicted position, averaged, from the plain-hook replacement model."""
    with torch.no_grad():
        target = F.log_softmax(model.model(ids).logits[:, 1:].float(), -1).flatten(0, 1)
    logp = F.log_softmax(hooked_logits(model, clt, ids)[:, 1:], -1).flatten(0, 1)
    return F.kl_div(logp, target, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("record", [False, True])
def test_trace_gradients_equal_those_of_a_plain_hook_replacement(request, model_name, record):
    model = request.getfixturevalue(model_name)
    clt = clt_for(model)
    rm = ReplacementModel(model, clt)
    ids = random_ids(model, 2, 12)
    weights = torch.randn(len(model.tokenizer), generator=torch.Generator().manual_seed(3))

    def gradients(logits: torch.Tensor) -> list[torch.Tensor]:
        clt.zero_grad()
        (logits.log_softmax(-1) @ weights).sum().backward()
        return [None if p.grad is None else p.grad.clone() for p in clt.parameters()]

    ours = gradients(rm.trace(ids, record=record).logits)
    reference = gradients(hooked_logits(model, clt, ids))
    for (name, _), a, b in zip(clt.named_parameters(), ours, reference, strict=True):
        # Layer by layer, θ gets no pseudo-gradient: it stays as trained.
        if name == "activation.log_threshold":
            assert a is None and b is None
            continue
        assert a.abs().sum() > 0, name
        scale = b.abs().max()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), f"{name}: max diff {(a - b).abs().max()}"


def test_the_step_loss_is_kl_plus_the_weighted_local_error(tiny_gpt2):
    clt = clt_for(tiny_gpt2)
    ids = random_ids(tiny_gpt2, 2, 12)
    reference_kl = kl_to_original(tiny_gpt2, clt, ids)
    # the local error: on the original run, at positions 1, 5, 9 (every 4th after BOS)
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(clt.n_layers))
    x, y = resid[:, [1, 5, 9]].flatten(0, 1), mlp[:, [1, 5, 9]].flatten(0, 1)  # (6, layers, d)
    with torch.no_grad():
        error = (clt(x).reconstruction - y) / clt.output_scale
    local = error.pow(2).sum(-1).mean()
    losses = {}
    for coef in (0.0, 0.5):
        module = FinetuneModule(
            ReplacementModel(tiny_gpt2, clt), FinetuneConfig(kl_steps=1, kl_mse_coef=coef)
        )
        # The step logs to its trainer's loggers: none here.
        module.trainer = type("Stub", (), {"loggers": []})()
        module.log = lambda *args, **kwargs: None
        loss = module.training_step((ids, None), 0)
        assert loss.item() == pytest.approx((reference_kl + coef * local).item(), rel=1e-4)
        assert loss.requires_grad
        losses[coef] = loss
    # The KL alone (coef 0) has the gradients of log_softmax + kl_div on the plain-hook replacement.
    names, weights = zip(
        *[(n, p) for n, p in clt.named_parameters() if not n.startswith("activation.")], strict=True
    )
    ours = torch.autograd.grad(losses[0.0], weights)
    reference = torch.autograd.grad(kl_to_original(tiny_gpt2, clt, ids), weights)
    for name, a, b in zip(names, ours, reference, strict=True):
        assert a.abs().sum() > 0, name
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), (
            f"{name}: max diff {(a - b).abs().max()}"
        )


def test_the_learning_rate_warms_up_holds_and_decays(tiny_gpt2):
    config = FinetuneConfig(kl_steps=20, kl_lr=1e-3, kl_warmup_steps=4, kl_lr_decay=0.25)
    module = FinetuneModule(ReplacementModel(tiny_gpt2, clt_for(tiny_gpt2)), config)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    expected = [1e-3 * min(1.0, (s + 1) / 4) * min(1.0, (20 - s) / 5) for s in range(20)]
    assert lrs == pytest.approx(expected)
    assert (
        lrs[0] == pytest.approx(2.5e-4) and lrs[10] == pytest.approx(1e-3) and lrs[19] == pytest.approx(2e-4)
    )


def test_the_encoder_learns_at_its_own_scale_of_the_rate_and_the_thresholds_not_at_all(tiny_gpt2):
    config = FinetuneConfig(kl_steps=20, kl_lr=1e-3, kl_warmup_steps=4, kl_encoder_lr_scale=2.5)
    clt = clt_for(tiny_gpt2)
    module = FinetuneModule(ReplacementModel(tiny_gpt2, clt), config)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    rest, encoder = scheduler.optimizer.param_groups
    assert encoder["params"] == [clt.W_enc] and len(rest["params"]) == len(list(clt.parameters())) - 2
    assert all(p is not clt.activation.log_threshold for p in rest["params"])
    for _ in range(6):  # past the warm-up, both at their peak
        scheduler.optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([1e-3, 2.5e-3])
    with pytest.raises(ValueError, match="kl_encoder_lr_scale must be positive, not 0"):
        FinetuneConfig(kl_encoder_lr_scale=0)


def test_a_time_budget_that_binds_decays_the_learning_rate_by_time(tiny_gpt2):
    config = FinetuneConfig(kl_steps=20, kl_lr=1e-3, kl_warmup_steps=0, kl_lr_decay=0.5, kl_max_minutes=1.0)
    module = FinetuneModule(ReplacementModel(tiny_gpt2, clt_for(tiny_gpt2)), config)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert module.progress(3) == 3.0  # before the first step: no clock yet
    module.on_train_start()
    assert module.progress(3) == 3.0  # keeping pace with the budget: the step schedule
    module.started -= 45.0  # three quarters of the minute spent at step 1: as far as step 15 of 20
    assert module.progress(1) == pytest.approx(15.0, abs=0.05)
    scheduler.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * (20 - 15) / 10, rel=0.01)
    module.started -= 60.0  # over budget: the rate is 0, not negative
    scheduler.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == 0.0
    unbounded = FinetuneModule(ReplacementModel(tiny_gpt2, clt_for(tiny_gpt2)), FinetuneConfig(kl_steps=20))
    unbounded.on_train_start()
    unbounded.started -= 1e6
    assert unbounded.progress(4) == 4.0


def test_the_clt_runs_in_bf16_mixed_precision_when_the_model_runs_in_bf16(tiny_gpt2):
    finetune = FinetuneConfig(kl_steps=7)
    stage = _stage_config(TrainerConfig(precision="bf16-mixed", max_steps=50), finetune, tiny_gpt2)
    assert (stage.precision, stage.max_steps, stage.accelerator) == ("32-true", 7, "cpu")
    bf16 = load_model("tiny-gpt2", dtype="bfloat16")
    assert _stage_config(TrainerConfig(), finetune, bf16).precision == "bf16-mixed"


@pytest.mark.parametrize("pool", [None, 24])
def test_finetune_lowers_the_kl_on_held_out_text(tmp_path, tiny_gpt2, pool):
    clt = clt_for(tiny_gpt2, seed=5)
    batches = token_sequences(
        "shakespeare",
        tiny_gpt2.tokenizer,
        seq_len=32,
        bos_token_id=tiny_gpt2.bos_token_id,
        split="eval",
        batch_size=8,
    )
    held_out = next(iter(batches))
    before = kl_to_original(tiny_gpt2, clt, held_out).item()
    tuned = finetune(
        clt,
        model=tiny_gpt2,
        corpus="shakespeare",
        seq_len=32,
        config=FinetuneConfig(
            kl_steps=20, kl_sequences=8, kl_lr=3e-3, kl_warmup_steps=2, kl_text_sequences=pool
        ),
        run_dir=tmp_path,
        trainer_config=TrainerConfig(wandb=False, val_every=0),
        enable_progress_bar=False,
    )
    assert tuned is clt and not tuned.training
    after = kl_to_original(tiny_gpt2, clt, held_out).item()
    assert after < 0.7 * before, (before, after)


def test_training_text_cycles_and_refuses_a_corpus_too_short(tiny_gpt2, tmp_path):
    text = TrainingText("shakespeare", tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=2)
    first = [batch for _, batch in zip(range(3), text, strict=False)]
    assert all(ids.shape == (2, 16) and (ids[:, 0] == 0).all() and keys is None for ids, keys in first)
    (tmp_path / "short.txt").write_text("two words")
    short = TrainingText(
        str(tmp_path / "short.txt"), tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=2
    )
    with pytest.raises(
        ValueError, match="fewer than 2 training sequences of 16 tokens: lower finetune.kl_seq"
    ):
        next(iter(short))
    pooled = TrainingText(
        str(tmp_path / "short.txt"), tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=2, pool=3
    )
    with pytest.raises(
        ValueError, match="fewer than 3 training sequences of 16 tokens: lower finetune.kl_text"
    ):
        next(iter(pooled))
    with pytest.raises(ValueError, match="A pool of 1 sequences cannot fill batches of 2"):
        TrainingText("shakespeare", tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=2, pool=1)


def test_pooled_text_reads_its_first_sequences_in_a_new_order_each_epoch(tiny_gpt2):
    pool = list(
        token_sequences("shakespeare", tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=7)
    )[0]  # the split's first 7 sequences
    text = TrainingText("shakespeare", tiny_gpt2.tokenizer, seq_len=16, bos_token_id=0, batch_size=2, pool=7)
    torch.manual_seed(0)
    batches = [batch for _, batch in zip(range(9), text, strict=False)]
    for ids, keys in batches:
        assert ids.shape == (2, 16) and torch.equal(ids, pool[keys])
    # three batches an epoch (the odd sequence out waits for a later one), no key twice within an epoch
    epochs = [torch.cat([keys for _, keys in batches[i : i + 3]]).tolist() for i in (0, 3, 6)]
    assert all(len(set(epoch)) == 6 for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_a_pooled_sequence_runs_the_original_model_once(tiny_gpt2, monkeypatch):
    import cltlab.end_to_end as end_to_end

    clt = clt_for(tiny_gpt2)
    ids = random_ids(tiny_gpt2, 3, 12)
    runs = []
    trace = end_to_end.trace_sites
    monkeypatch.setattr(end_to_end, "trace_sites", lambda *a, **k: runs.append(a[1].shape) or trace(*a, **k))
    config = FinetuneConfig(kl_steps=1, kl_mse_coef=0.5, kl_text_sequences=10)
    module = FinetuneModule(ReplacementModel(tiny_gpt2, clt), config)
    module.trainer = type("Stub", (), {"loggers": []})()
    module.log = lambda *args, **kwargs: None
    keys = torch.tensor([4, 0, 9])
    first = module.training_step((ids, keys), 0).item()
    assert runs == [(3, 12)] and module.kept.kept.nonzero().flatten().tolist() == [0, 4, 9]
    # the targets: the original's likeliest KEPT_TOKENS at each position after BOS, and its sites
    log_p = F.log_softmax(trace(tiny_gpt2, ids, 0, clt.n_layers, with_logits=True).logits[:, 1:], -1)
    top, tokens = log_p.topk(end_to_end.KEPT_TOKENS, -1)
    kept = module.teacher(ids, keys)
    assert len(runs) == 1
    assert kept.log_p.shape == (3, 11, end_to_end.KEPT_TOKENS) and torch.allclose(kept.log_p, top, atol=1e-5)
    assert torch.equal(kept.tokens, tokens.int())
    resid, mlp = hooked_sites(tiny_gpt2, ids, range(clt.n_layers))
    assert torch.allclose(kept.resid_mid, resid[:, 1::4], atol=1e-5)
    assert torch.allclose(kept.bos, mlp[:, :1], atol=1e-5)
    # the same sequences in another order: the kept runs, stacked in that order, give the same loss
    order = torch.tensor([2, 0, 1])
    assert module.training_step((ids[order], keys[order]), 0).item() == pytest.approx(first, rel=1e-6)
    assert len(runs) == 1
    # a batch with one new sequence runs the original model on the whole batch, and keeps the new one
    module.training_step((ids[:2], torch.tensor([4, 5])), 0)
    assert len(runs) == 2 and module.kept.kept.nonzero().flatten().tolist() == [0, 4, 5, 9]
    # unpooled text keeps nothing
    fresh = FinetuneModule(ReplacementModel(tiny_gpt2, clt), FinetuneConfig(kl_steps=1))
    fresh.trainer, fresh.log = module.trainer, module.log
    fresh.training_step((ids, None), 0)
    assert len(runs) == 3 and fresh.kept is None


def test_the_kl_of_kept_tokens_coarsens_the_distributions():
    torch.manual_seed(0)
    log_p = F.log_softmax(3 * torch.randn(2, 5, 40), -1)
    logits = torch.randn(2, 5, 40, requires_grad=True)
    full = F.kl_div(F.log_softmax(logits, -1), log_p, log_target=True, reduction="sum") / 10
    assert kl_divergence(log_p, None, logits).item() == pytest.approx(full.item(), rel=1e-5)
    # every token kept, in any order: the full KL and its gradient
    shuffled = torch.stack([torch.randperm(40) for _ in range(10)]).view(2, 5, 40)
    every = kl_divergence(log_p.gather(-1, shuffled), shuffled.int(), logits)
    assert every.item() == pytest.approx(full.item(), rel=1e-5)
    (a,) = torch.autograd.grad(every, logits)
    (b,) = torch.autograd.grad(full, logits)
    assert torch.allclose(a, b, atol=1e-6)
    # the likeliest 8: the KL of (those 8 tokens, the rest as one outcome), below the full one
    top, tokens = log_p.topk(8, -1)
    q = F.softmax(logits, -1).detach()
    p8, q8 = top.exp(), q.gather(-1, tokens)
    p_rest, q_rest = 1 - p8.sum(-1), 1 - q8.sum(-1)
    coarse = ((p8 * (p8 / q8).log()).sum(-1) + p_rest * (p_rest / q_rest).log()).mean()
    kept = kl_divergence(top, tokens.int(), logits)
    assert kept.item() == pytest.approx(coarse.item(), rel=1e-5)
    assert 0 < kept.item() < full.item()
    (grad,) = torch.autograd.grad(kept, logits)
    assert grad.isfinite().all() and grad.abs().sum() > 0


def test_finetune_refuses_a_pool_larger_than_half_the_free_memory(tiny_gpt2):
    replacement = ReplacementModel(tiny_gpt2, clt_for(tiny_gpt2))
    _check_pool_memory(replacement, 32, 8)  # ~1.6 MB of float32 logits: fine
    with pytest.raises(ValueError, match=r"kl_text_sequences=100000000 would keep .* GiB .* lower it"):
        _check_pool_memory(replacement, 32, 10**8)


def test_train_runs_the_fine_tune_after_the_mse_stage(tmp_path, buffer_path, tiny_gpt2, monkeypatch):
    import cltlab.validation

    loaded = []
    monkeypatch.setattr(
        cltlab.validation, "load_model", lambda *a, **k: loaded.append(a) or load_model(*a, **k)
    )
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=32),
        optimizer=OptimizerConfig(lr=1e-3),
        trainer=TrainerConfig(
            max_steps=6, wandb=False, log_every=1, checkpoint_every=6, val_every=4, val_sequences=2
        ),
        data=DataConfig(batch_size=128),
        finetune=FinetuneConfig(kl_steps=5, kl_sequences=4, kl_lr=1e-3, kl_mse_coef=0.1),
    )
    result = train(config, buffer_path, tmp_path, enable_progress_bar=False)
    series = plots.read_metrics(result.log_dir)
    # The fine-tune's steps continue the MSE stage's: 7-11, validated at its 4th step and after its last.
    assert [step for step, _ in series["e2e/kl"]] == [7, 8, 9, 10, 11]
    assert [step for step, _ in series["e2e/local_mse"]] == [7, 8, 9, 10, 11]
    assert [step for step, _ in series["val/kl"]] == [4, 6, 10, 11]
    assert all(value >= 0 for _, value in series["e2e/kl"])
    # The stage validates against the MSE stage's held-out runs, taken over (the validation model was loaded
    # once): the figures evaluate gives.
    assert loaded == [("tiny-gpt2",)]
    final = held_out_metrics(tiny_gpt2, result.clt)
    assert series["val/kl"][-1][1] == pytest.approx(final.kl, rel=1e-4)
    assert series["val/top1"][-1][1] == pytest.approx(final.top1_agreement)
    # The saved CLT is the fine-tuned one; the MSE stage's last checkpoint is untouched and differs from it.
    saved = CrossLayerTranscoder.load(result.clt_dir)
    for a, b in zip(saved.state_dict().values(), result.clt.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    last = CLTModule.load_from_checkpoint(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    ).clt
    assert not torch.equal(last.W_enc, saved.W_enc)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ]
    with open(sorted(result.log_dir.glob("version_*/metrics.csv"))[-1], newline="") as f:
        assert "e2e/kl" in next(csv.reader(f))
    fig = plots.training_curves(result.log_dir)
    assert "e2e/kl" in {trace.name for trace in fig.data}


def test_finetune_refuses_what_it_cannot_run(buffer_path):
    from cltlab import DiscBuffer

    config = TrainConfig(finetune=FinetuneConfig(kl_steps=3))
    check_finetune(TrainConfig(), object())  # no fine-tune: nothing to check
    with pytest.raises(ValueError, match="needs the model and corpus the activations came from"):
        check_finetune(config, object())
    multi = config.replace(devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="runs on one device"):
        check_finetune(multi, DiscBuffer(buffer_path, batch_size=100))
    with pytest.raises(ValueError, match="kl_steps and kl_warmup_steps must be non-negative"):
        FinetuneConfig(kl_steps=-1)
    with pytest.raises(ValueError, match="kl_lr must be positive"):
        FinetuneConfig(kl_lr=0)
    with pytest.raises(ValueError, match="kl_lr_decay must be in"):
        FinetuneConfig(kl_lr_decay=1.5)
    with pytest.raises(ValueError, match="kl_max_minutes must be positive"):
        FinetuneConfig(kl_max_minutes=0)
    with pytest.raises(
        ValueError, match=r"kl_text_sequences must be None or at least kl_sequences \(4\), not 3"
    ):
        FinetuneConfig(kl_sequences=4, kl_text_sequences=3)
    with pytest.raises(ValueError, match="needs config.kl_steps > 0"):
        finetune(
            None, model="tiny-gpt2", corpus="shakespeare", seq_len=8, config=FinetuneConfig(), run_dir="."
        )
