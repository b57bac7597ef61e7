"""bf16 falls back to float32 only on CPUs where it is slow, and says so."""

from __future__ import annotations

import logging

import pytest

from cltlab import precision


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_requests_follow_the_cpu(monkeypatch, caplog, fast):
    monkeypatch.setattr(precision, "fast_bfloat16_cpu", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="cltlab"):
        assert precision.training_precision("bf16-mixed", accelerator="cpu") == (
            "bf16-mixed" if fast else "32-true"
        )
        assert precision.model_dtype("bfloat16", "cpu") == ("bfloat16" if fast else "float32")
    assert ("no fast bfloat16" in caplog.text) is not fast
    # Other requests, and other devices, are left alone.
    assert precision.training_precision("32-true", accelerator="cpu") == "32-true"
    assert precision.training_precision("bf16-mixed", accelerator="gpu") == "bf16-mixed"
    assert precision.model_dtype("float16", "cpu") == "float16"
    assert precision.model_dtype("bfloat16", "cuda") == "bfloat16"


def test_the_measurement_is_a_cached_bool():
    assert isinstance(precision.fast_bfloat16_cpu(), bool)
    assert precision.fast_bfloat16_cpu.cache_info().currsize == 1
