"""Schemathesis against the activation server's own OpenAPI document: every endpoint, valid and invalid requests.

The server runs on loopback through ``serve`` (uvicorn, as in a notebook) over the shared tiny buffer, with small
budgets so that the fuzzer reaches them. Every answer must be documented for its endpoint (status, content type,
schema), none may be a 5xx, and none may take longer than ``TIMEOUT_S``; afterwards the server still serves exact
batches. Bounded in time by the number of examples per endpoint.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from hypothesis import HealthCheck, settings

from cltlab import DiscBuffer
from cltlab.server import ActivationClient, Limits, serve

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TIMEOUT_S = 10  # a request that takes longer hangs
LIMITS = Limits(max_stream_batches=4, max_reply_bytes=2**20, max_streams=2, max_rings=2, lease_s=1.0)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


SERVER: dict[str, str] = {}  # the live server's URL, for the generated tests


@pytest.fixture(scope="module")
def server(buffer_path):
    with serve(buffer_path, limits=LIMITS) as handle:
        SERVER["url"] = handle.url
        yield handle


def stub_document() -> dict:
    """The app's OpenAPI document, made at import (``parametrize`` needs it before fixtures run) from the same
    routes over a stub source; ``test_the_document_is_the_live_servers`` checks it is the live server's."""
    from cltlab.server.app import create_app
    from cltlab.server.protocol import SourceInfo
    from cltlab.server.state import ServerState

    class Stub:
        info = SourceInfo("disc", "stub", 4, 64, 0, "float32", 500)

    return create_app(ServerState(Stub(), LIMITS)).openapi()


schema = schemathesis.openapi.from_dict(stub_document())


def test_the_document_is_the_live_servers(server):
    live = httpx.get(f"{server.url}/openapi.json").json()
    assert {**live, "info": None} == {**stub_document(), "info": None}  # all but the source's description


@schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_endpoint_answers_as_documented(case, server):
    case.call_and_validate(base_url=SERVER["url"], checks=CHECKS, timeout=TIMEOUT_S)


def test_the_server_still_serves_exact_batches(server, buffer_path):
    """Run after the fuzzer (pytest keeps the file's order): nothing it sent broke a batch size."""
    reference = DiscBuffer(buffer_path, batch_size=100)
    client = ActivationClient(server.url, retry_s=20)
    batches = [client.tensor(100, index=1), *client.stream(100, 3, transport="http", index=2)]
    batches += list(client.stream(100, 4, transport="shm"))  # after the fuzzer's leases expire
    for batch in batches:
        expected = reference[batch.index % len(reference)]
        assert torch.equal(batch.resid_mid, expected.resid_mid) and torch.equal(
            batch.mlp_out, expected.mlp_out
        )
    assert server.errors == [] and server.stats["errors"] == []
