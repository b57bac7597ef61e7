"""Distributed training: DDP over two CPU processes (gloo) reads disjoint parts of the buffer and keeps the ranks'
weights identical.

The test runs this file as a script (``python tests/test_ddp.py BUFFER RUN OUT``): ``train`` with
``strategy="ddp"`` on ``devices=2`` CPUs, where Lightning starts rank 1 by running the same script again, as it
does with ``torchrun`` or ``srun``. Each rank writes the rows it trained on and its final weights to ``OUT``; with a
fourth argument, ``nan-on-rank-1``, rank 1's loss turns NaN and each rank writes the error it stopped with.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cltlab.training
from cltlab import CrossLayerTranscoder, DiscBuffer, train
from cltlab.cli import main, parse
from cltlab.config import DataConfig, OptimizerConfig, TrainConfig, TrainerConfig, TranscoderConfig
from cltlab.training import TrainResult, make_trainer, strategy_for

STEPS = 5
# 500 rows in batches of 50 give each of the two ranks 5 batches: one epoch of both covers the buffer once.
CONFIG = TrainConfig(
    transcoder=TranscoderConfig(d_features=32),
    optimizer=OptimizerConfig(lr=1e-3),
    trainer=TrainerConfig(
        max_steps=STEPS,
        wandb=False,
        log_every=1,
        checkpoint_every=STEPS,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
    ),
    data=DataConfig(batch_size=50),
)


def row_key(row: torch.Tensor) -> str:
    """A name for one stored row (its resid_mid bytes), to tell which rows a rank trained on."""
    return hashlib.sha1(row.contiguous().numpy().tobytes()).hexdigest()


def run_rank(buffer: Path, run_dir: Path, out: Path) -> None:
    """What every rank runs: train, recording the rows of each batch and the weights before and after."""
    import lightning as L

    class Record(L.Callback):
        def __init__(self):
            self.rows: list[str] = []
            self.init: dict[str, torch.Tensor] = {}

        def on_train_start(self, trainer, module):
            self.init = {k: v.detach().clone() for k, v in module.clt.state_dict().items()}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.rows += [row_key(row) for row in batch.resid_mid]

    record = Record()
    result = train(CONFIG, buffer, run_dir, callbacks=[record], enable_progress_bar=False)
    save_file(record.init, out / f"init-{result.rank}.safetensors")
    save_file(result.clt.state_dict(), out / f"final-{result.rank}.safetensors")
    (out / f"rows-{result.rank}.json").write_text(json.dumps(record.rows))


def run_rank_with_nan(buffer: Path, run_dir: Path, out: Path) -> None:
    """What every rank runs when rank 1's loss turns NaN at step 2: train, and write the error each rank raised."""
    from cltlab.clt import CrossLayerTranscoder as CLT

    loss, calls = CLT.loss, []
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # Lightning sets it for the ranks it starts, here rank 1

    def nan_on_rank_1(self, *args, **kwargs):
        calls.append(1)
        out = loss(self, *args, **kwargs)
        return out._replace(total=out.total * float("nan")) if rank == 1 and len(calls) == 3 else out

    CLT.loss = nan_on_rank_1
    try:
        train(CONFIG, buffer, run_dir, enable_progress_bar=False)
    except FloatingPointError as error:
        (out / f"error-{rank}.txt").write_text(str(error))
        raise
    (out / f"finished-{rank}.txt").write_text("")


def run_ddp(buffer_path: Path, run_dir: Path, out: Path, *options: str) -> tuple[int, str]:
    """Run this file as rank 0 of a two-process DDP job (rank 0 starts rank 1); its exit status and the log of both.
    A run still going after 120 s is stopped with both ranks and fails the test, so a hang never stalls CI."""
    out.mkdir()
    # Two single-threaded processes on the CI's two cores; no outer SLURM or torchrun job for Lightning to join.
    launcher = ("SLURM_", "TORCHELASTIC_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, str(buffer_path), str(run_dir), str(out), *options]
    # A new session, so that a hung run can be stopped with both ranks (rank 1 is rank 0's child). The log is read
    # to its end, which comes only when both ranks have exited (rank 1 holds the same pipe).
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"DDP run did not finish in 120 s:\n{log[-4000:]}") from None
    return proc.returncode, log


def test_ddp_ranks_read_disjoint_batches_and_agree(tmp_path, buffer_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    returncode, log = run_ddp(buffer_path, run_dir, out)
    assert returncode == 0, log[-4000:]

    # Each rank trained on its own rows; together, one epoch of both covered every row of the buffer once.
    rows = [Counter(json.loads((out / f"rows-{rank}.json").read_text())) for rank in (0, 1)]
    assert [r.total() for r in rows] == [STEPS * CONFIG.data.batch_size] * 2
    buffer = DiscBuffer(buffer_path, batch_size=CONFIG.data.batch_size)
    every_row = Counter(row_key(row) for row in buffer.read(0, buffer.n_tokens).resid_mid)
    buffer.close()
    assert rows[0] + rows[1] == every_row and every_row.total() == 500
    repeated = {key for key, count in every_row.items() if count > 1}  # rows of equal content (one pair here)
    assert len(repeated) <= 2 and not (set(rows[0]) & set(rows[1])) - repeated

    # Both ranks started from the same weights and ended with the same, different, weights.
    init = [load_file(out / f"init-{rank}.safetensors") for rank in (0, 1)]
    final = [load_file(out / f"final-{rank}.safetensors") for rank in (0, 1)]
    assert init[0].keys() == final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(init[0][name], init[1][name]), name
        assert torch.equal(final[0][name], final[1][name]), name
    assert not torch.equal(final[0]["W_enc"], init[0]["W_enc"])

    # Rank 0 alone wrote the CLT, the checkpoints and the logs.
    saved = CrossLayerTranscoder.load(run_dir / "clt")
    assert all(torch.equal(v, final[0][k]) for k, v in saved.state_dict().items())
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(list((run_dir / "logs").glob("version_*/metrics.csv"))) == 1


def test_a_nan_on_one_rank_stops_both_with_the_same_error(tmp_path, buffer_path):
    # Rank 1's loss turns NaN at step 2. Checked on rank 1 alone, rank 1 raised and rank 0 waited for it in the
    # next all-reduce; the check is a collective, so both ranks stop there with one message.
    run_dir, out = tmp_path / "run", tmp_path / "out"
    returncode, log = run_ddp(buffer_path, run_dir, out, "nan-on-rank-1")
    assert returncode != 0, log[-4000:]
    errors = {path.name: path.read_text() for path in out.iterdir()}
    expected = (
        "Loss became nan at step 2 on rank 1 of 2; lower the learning rate (the last checkpoint is kept)."
    )
    assert errors == {"error-0.txt": expected, "error-1.txt": expected}, log[-4000:]
    assert not (run_dir / "clt").exists()


def test_topk_thresholds_are_frozen_so_ddp_does_not_wait_for_them(tmp_path, buffer_path):
    # TopK never uses the JumpReLU thresholds; DDP raises on a trainable parameter that gets no gradient.
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16, activation_kind="topk", k=4),
        trainer=TrainerConfig(max_steps=2, wandb=False, checkpoint_every=100),
        data=DataConfig(batch_size=125),
    )
    result = train(config, buffer_path, tmp_path, enable_progress_bar=False)
    assert not any(p.requires_grad for p in result.clt.activation.parameters())
    assert all(
        p.requires_grad for name, p in result.clt.named_parameters() if not name.startswith("activation")
    )


@pytest.mark.parametrize(("devices", "expected"), [("4", 4), ("auto", "auto"), ("0,1", "0,1")])
def test_cli_flags_choose_devices_nodes_and_strategy(devices, expected):
    argv = ["train", "--profile", "ci", "--trainer.devices", devices, "--trainer.num-nodes", "2"]
    config = parse([*argv, "--trainer.strategy", "fsdp"]).config.trainer
    assert (config.devices, config.num_nodes, config.strategy) == (expected, 2, "fsdp")


def test_the_trainer_follows_the_config(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    extra = ModelCheckpoint()
    trainer = make_trainer(CONFIG.trainer, tmp_path, callbacks=[extra], enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2 and trainer.num_nodes == 1
    assert (
        not trainer._accelerator_connector.use_distributed_sampler
    )  # the buffer is sharded by ActivationData
    assert (
        extra in trainer.callbacks and len(trainer.checkpoint_callbacks) == 2
    )  # added to ours, not replacing
    fsdp = strategy_for("fsdp")  # Lightning's FSDP needs GPUs, so only its settings are checked here
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"]
    assert strategy_for("ddp_spawn") == "ddp_spawn"


def test_cli_train_prints_on_rank_zero_only(monkeypatch, capsys, tmp_path):
    def fake_train(config, buffer, run_dir, *, resume):
        return TrainResult(None, run_dir / "clt", run_dir / "logs", run_dir / "checkpoints", rank=1)

    monkeypatch.setattr(cltlab.training, "train", fake_train)
    assert main(["train", "--profile", "ci", "--run-dir", str(tmp_path), "--trainer.devices", "2"]) == 0
    assert capsys.readouterr().out == ""


if __name__ == "__main__":
    paths = [Path(arg) for arg in sys.argv[1:4]]
    if sys.argv[4:] == ["nan-on-rank-1"]:
        run_rank_with_nan(*paths)
    else:
        run_rank(*paths)
