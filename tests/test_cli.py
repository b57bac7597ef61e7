"""Command line: options come from the config dataclasses; each stage runs end to end on tiny inputs."""

from __future__ import annotations

import json

import pytest
from helpers import make_clt

from cltlab import DiscBuffer
from cltlab.cli import _parse_value, apply_options, build_parser, field_docs, main
from cltlab.config import HarvestConfig, TrainConfig


def test_field_docs_are_the_dataclass_docstrings():
    docs = field_docs(HarvestConfig)
    assert docs["seq_len"] == "Tokens per sequence, BOS included."
    assert set(docs) == set(HarvestConfig.__dataclass_fields__)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("false", True, False),
        ("yes", False, True),
        ("1e3", 5, 1000),
        ("0.5", 0.1, 0.5),
        ("1:3", None, (1, 3)),
        ("2,4", None, (2, 4)),
        ("none", None, None),
        ("bfloat16", "float16", "bfloat16"),
    ],
)
def test_parse_value_follows_the_default_type(text, default, expected):
    assert _parse_value(text, default) == expected


def test_options_override_the_profile():
    args = build_parser().parse_args(
        ["train", "--profile", "ci", "--max-steps", "7", "--lr", "0.01", "--cross-layer", "false"]
    )
    config = apply_options(TrainConfig(max_steps=60, lr=1e-3), args)
    assert (config.max_steps, config.lr, config.cross_layer) == (7, 0.01, False)
    assert config.batch_size == TrainConfig().batch_size  # untouched fields keep their value


def test_invalid_option_value_is_validated():
    args = build_parser().parse_args(["harvest", "--profile", "ci", "--layers", "3:1"])
    with pytest.raises(ValueError, match="layers must be a range"):
        apply_options(HarvestConfig(), args)


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
        "1:3",
    ]
    assert main(["harvest", "--profile", "ci", "--run-dir", str(run), *small]) == 0
    assert "62 tokens in" in (out := capsys.readouterr().out) and "(complete;" in out
    buffer = DiscBuffer(run / "activations", batch_size=62)
    assert (buffer.n_tokens, buffer.layer_start, buffer.n_layers) == (62, 1, 2)
    buffer.close()

    train = [
        "--max-steps",
        "2",
        "--batch-size",
        "31",
        "--d-features",
        "8",
        "--wandb",
        "false",
        "--log-every",
        "1",
    ]
    assert main(["train", "--profile", "ci", "--run-dir", str(run), *train]) == 0
    assert "saved the CLT to" in capsys.readouterr().out
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
