"""Command line: options are the config dataclasses' fields, nested, defaulting to the profile; YAML in and out;
each stage runs end to end on tiny inputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from helpers import make_clt

from cltlab import DiscBuffer
from cltlab.cli import config_from, main, parse
from cltlab.config import HarvestConfig, LossConfig, TrainConfig, get_profile
from cltlab.plots import read_metrics


def train_config(*argv: str) -> TrainConfig:
    return parse(["train", *argv]).config


def test_options_override_the_profile_part_by_part():
    config = train_config(
        "--profile", "ci", "--trainer.max-steps", "7", "--optimizer.lr", "0.01", "--transcoder.cross_layer", "false"
    )  # fmt: skip
    expected = get_profile("ci").train
    expected.trainer.max_steps, expected.optimizer.lr, expected.transcoder.cross_layer = 7, 0.01, False
    assert config == expected  # every other field keeps the profile's value
    assert train_config("--profile", "default") == get_profile("default").train


def test_the_profile_may_come_after_the_options():
    assert train_config("--trainer.max_steps", "7", "--profile", "ci").trainer.max_steps == 7
    assert train_config("--trainer.max_steps", "7", "--profile", "ci").data == get_profile("ci").train.data


def test_a_field_defaulting_to_none_takes_an_int_and_a_range_takes_a_list():
    # The hand-written parser of before read --shard-tokens 2000 as a tuple and the harvest died with a TypeError.
    options = parse(["harvest", "--profile", "ci", "--shard-tokens", "2000", "--layers", "[1, 3]"]).options
    config = config_from(HarvestConfig, options)
    assert (config.shard_tokens, config.layers) == (2000, (1, 3))
    assert config == dataclasses.replace(get_profile("ci").harvest, shard_tokens=2000, layers=(1, 3))
    assert (
        config_from(HarvestConfig, parse(["harvest", "--shard_tokens", "null"]).options).shard_tokens is None
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["harvest", "--layers", "[3, 1]"], "layers must be a range (start, stop) with 0 <= start < stop"),
        (["harvest", "--job", "3/1"], "--job"),
        (["train", "--loss.sparsity_coef", "abc"], 'key "loss.sparsity_coef"'),
        (["train", "--loss.sparsity_coeff", "1"], "--loss.sparsity_coeff"),
        (["train", "--loss.decoding", "diagonal"], "decoding must be auto, dense or sparse, not 'diagonal'"),
        (["train", "--transcoder.activation_kind", "relu"], "activation_kind must be one of jumprelu, topk"),
        (["train", "--profile", "nope"], "Unknown profile 'nope'"),
        (["evaluate", "--device", "tpu9"], "device must be auto, cpu, cuda or cuda:N, not 'tpu9'"),
        (["run", "--device", "tpu9"], "device must be auto, cpu, cuda or cuda:N, not 'tpu9'"),
        (["serve", "--live", "--shuffle_rows", "many"], "--shuffle_rows"),
    ],
)
def test_a_wrong_option_is_one_error_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_help_is_the_field_docstrings_with_the_profiles_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["train", "--profile", "ci", "--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert "--loss.sparsity_coef SPARSITY_COEF λ of the tanh sparsity penalty" in help
    assert "--data.batch_size BATCH_SIZE Tokens per step" in help
    assert "(type: int, default: 256)" in help  # ci's batch size, not the dataclass default of 1024


def test_print_config_writes_a_yaml_file_that_config_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["train", "--profile", "ci", "--loss.sparsity_coef", "0.5", "--print_config"])
    assert exit.value.code == 0
    written = yaml.safe_load(capsys.readouterr().out)
    assert written["loss"]["sparsity_coef"] == 0.5 and written["trainer"]["max_steps"] == 60
    written["trainer"]["max_steps"] = 9
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(written))
    config = train_config("--config", str(path))
    assert (config.loss.sparsity_coef, config.trainer.max_steps) == (0.5, 9)
    assert config.transcoder == get_profile("ci").train.transcoder  # the file held ci's values for the rest
    # Later options win over the file.
    assert train_config("--config", str(path), "--trainer.max_steps", "3").trainer.max_steps == 3


def test_a_yaml_file_may_hold_only_some_parts(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text("loss:\n  sparsity_c: 2.5\n")
    config = train_config("--profile", "ci", "--config", str(path))
    assert config.loss == dataclasses.replace(get_profile("ci").train.loss, sparsity_c=2.5)
    path.write_text("loss:\n  sparsity_cc: 2.5\n")
    with pytest.raises(SystemExit):
        train_config("--profile", "ci", "--config", str(path))


def test_a_profile_saved_as_yaml_gives_the_defaults(tmp_path):
    profile = get_profile("ci")
    profile.train.loss = LossConfig(sparsity_coef=0.125, decoding="dense")
    profile.harvest.layers = (0, 2)
    path = profile.save(tmp_path / "mine.yaml")
    assert get_profile(path) == profile
    parsed = parse(["train", "--profile", str(path)])
    assert parsed.profile == profile and config_from(TrainConfig, parsed.options) == profile.train
    assert config_from(HarvestConfig, parse(["harvest", "--profile", str(path)]).options).layers == (0, 2)


def test_cli_harvest_train_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    small = [
        "--n-tokens",
        "62",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--layers",
        "[1,3]",
    ]
    assert main(["harvest", "--profile", "ci", "--run-dir", str(run), *small]) == 0
    assert "62 tokens in" in (out := capsys.readouterr().out) and "(complete;" in out
    buffer = DiscBuffer(run / "activations", batch_size=62)
    assert (buffer.n_tokens, buffer.layer_start, buffer.n_layers) == (62, 1, 2)
    buffer.close()

    train = ["--trainer.max_steps", "2", "--data.batch_size", "31", "--transcoder.d_features", "8"]
    train += ["--trainer.wandb", "false", "--trainer.log_every", "1", "--finetune.kl_steps", "2"]
    assert main(["train", "--profile", "ci", "--run-dir", str(run), *train]) == 0
    assert "saved the CLT to" in capsys.readouterr().out
    # The end-to-end stage ran after the MSE stage's 2 steps, on the two covered layers 1-2 of the harvest's model.
    assert [step for step, _ in read_metrics(run / "logs")["e2e/kl"]] == [3, 4]
    meta = json.loads((run / "clt" / "config.json").read_text())["config"]
    assert (meta["n_layers"], meta["d_model"], meta["d_features"], meta["layer_offset"]) == (2, 64, 8, 1)

    assert (
        main(
            ["evaluate", "--profile", "ci", "--run-dir", str(run), "--n-sequences", "2", "--batch-size", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "CE recovered" in out and "metrics written to" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["nmse"]) == 2 and metrics["n_tokens"] == 2 * (64 - 2)


def test_cli_evaluate_missing_clt(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved CLT"):
        main(["evaluate", "--profile", "ci", "--run-dir", str(tmp_path)])


def test_cli_evaluate_given_clt(tmp_path, capsys):
    clt_dir = make_clt(4, 64, 8).save(tmp_path / "my_clt")
    code = main(
        [
            "evaluate",
            "--profile",
            "ci",
            "--run-dir",
            str(tmp_path / "run"),
            "--clt",
            str(clt_dir),
            "--n-sequences",
            "2",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["l0"]) == 4


def test_a_yaml_file_naming_a_profile_takes_that_profiles_defaults(tmp_path):
    path = tmp_path / "ci.yaml"
    path.write_text("profile: ci\nloss:\n  sparsity_c: 2.5\n")
    parsed = parse(["train", "--config", str(path)])
    assert parsed.profile.name == "ci"
    assert parsed.config == get_profile("ci").train.replace(sparsity_c=2.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["harvest", "--profile", "ci", "--device", "cuda"])
    assert exit.value.code == 2
    assert "harvest: device 'cuda' asks for a GPU, and torch sees none here" in capsys.readouterr().err
    assert parse(["harvest", "--profile", "ci"]).options.device == "auto"


def test_cli_serves_live_activations_over_loopback():
    import re
    import subprocess
    import sys

    from cltlab.server import ActivationClient

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cltlab",
            "serve",
            "--live",
            "--profile",
            "ci",
            "--port",
            "0",
            "--seconds",
            "120",
            "--shuffle_rows",
            "2048",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if found := re.search(r"serving live tiny-gpt2 .* at (http://127\.0\.0\.1:\d+)", line):
                break
        else:
            raise AssertionError("cltlab serve --live printed no URL")
        client = ActivationClient(found[1])
        info = client.wait_for_data(timeout=60)
        assert info["kind"] == "live" and info["normalization"] is not None  # from the pool's 2048+ rows
        assert info["origin"] == {"model": "tiny-gpt2", "corpus": "shakespeare", "seq_len": 64}
        batch = client.tensor(16)
        assert batch.resid_mid.shape == (16, 4, 64) and batch.mlp_out.shape == (16, 4, 64)
        assert batch.resid_mid.abs().sum() > 0 and torch.isfinite(batch.mlp_out).all()
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cli_writes_the_dashboard_of_a_run(tmp_path, buffer_path, capsys):
    (tmp_path / "activations").symlink_to(buffer_path)
    clt = make_clt(4, 64, 8, normalization=False, threshold_init=0.5, seed=2)
    clt.set_normalization(*DiscBuffer(buffer_path, batch_size=100).stats)
    clt.save(tmp_path / "clt")
    assert main(["dashboard", "--profile", "ci", "--run_dir", str(tmp_path)]) == 0
    assert f"feature dashboard: {tmp_path / 'dashboard' / 'index.html'}" in capsys.readouterr().out
    assert len(list((tmp_path / "dashboard" / "features").glob("L*/*.html"))) == 4 * 8
    assert (tmp_path / "clt" / "feature_stats" / "stats.json").exists()  # the statistics, kept for next time
