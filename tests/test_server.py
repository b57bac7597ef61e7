"""The activation server: exact bytes on every path, concurrency, bad requests, tokens, stop/restart, live mode."""

from __future__ import annotations

import gc
import http.client
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import assert_exact, wait_until

import cltlab
from cltlab import DiscBuffer
from cltlab.config import DataConfig, TrainConfig, TrainerConfig, TranscoderConfig
from cltlab.corpus import token_sequences
from cltlab.server import ActivationClient, DiscSource, Limits, LiveSource, serve
from cltlab.server.app import create_app
from cltlab.server.client import Recycler, to_batch
from cltlab.server.protocol import FRAME
from cltlab.server.state import ServerState
from cltlab.sites import trace_sites

B = 100  # rows per batch: the 500-row buffer holds 5 batches


@pytest.fixture(scope="module")
def server(buffer_path):
    with serve(buffer_path) as handle:
        yield handle


@pytest.fixture(scope="module")
def reference(buffer_path):
    """Every batch of size B, as the DiscBuffer reads it."""
    buffer = DiscBuffer(buffer_path, batch_size=B)
    return [buffer[i] for i in range(len(buffer))]


def read_frames(body: bytes, row_bytes: int) -> list[tuple[int, int, bytes]]:
    """(rows, index, batch bytes) of each frame of a /activations/stream body."""
    frames, at = [], 0
    while at < len(body):
        rows, index = FRAME.unpack_from(body, at)
        size = 2 * rows * row_bytes
        frames.append((rows, index, body[at + FRAME.size : at + FRAME.size + size]))
        at += FRAME.size + size
    return frames


def test_exports_and_import_starts_nothing():
    assert {"serve", "ActivationClient"} <= set(cltlab.__all__)
    assert not [t for t in threading.enumerate() if t.name.startswith("cltlab-server")]


def test_info_health_and_openapi(server, buffer_path):
    assert repr(server).startswith(f"ServerHandle({server.url}, ")
    client = ActivationClient(server.url)
    info = client.info()
    assert (info["kind"], info["n_layers"], info["d_model"], info["dtype"], info["n_tokens"]) == (
        "disc", 4, 64, "float32", 500,
    )  # fmt: skip
    assert torch.allclose(
        client.normalization.input_mean, DiscBuffer(buffer_path, batch_size=B).stats.input_mean
    )
    assert client.health() == {"status": "ok", "error": None, "fill": 1.0}
    paths = set(httpx.get(f"{server.url}/openapi.json").json()["paths"])
    assert {
        "/health",
        "/info",
        "/stats",
        "/activations",
        "/activations/tensor",
        "/activations/stream",
    } <= paths


def test_json_tensor_and_stream_bytes_equal_the_buffer(server, reference):
    client = ActivationClient(server.url)
    for index in (0, 3, 7):  # 7 wraps around to batch 2
        assert_exact(client.tensor(B, index=index), reference)
        data = client.json(B, index=index)
        expected = reference[index % len(reference)]
        assert data["shape"] == [B, 4, 64]
        assert torch.equal(torch.tensor(data["resid_mid"]), expected.resid_mid)
        assert torch.equal(torch.tensor(data["mlp_out"]), expected.mlp_out)
    streamed = list(client.stream(B, 7, index=0, transport="http"))
    assert [b.index for b in streamed] == list(range(7))
    for batch in streamed:
        assert_exact(batch, reference)
    before = server.stats["batches"]
    shared = list(client.stream(B, 6, transport="shm"))
    assert len(shared) == 6 and len({b.index for b in shared}) == 6
    for batch in shared:
        assert_exact(batch, reference)
    assert server.stats["batches"] == before + 6 and client.same_host


def test_eight_concurrent_clients_get_disjoint_whole_exact_batches(server, reference):
    received, failures = [], []
    served = server.stats["batches"]

    def work(k: int) -> None:
        client = ActivationClient(server.url)
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                if k % 3 == 0:
                    batches = [client.tensor(B)]
                else:
                    batches = list(client.stream(B, 4, transport="shm" if k % 3 == 1 else "http"))
                for batch in batches:
                    assert batch.resid_mid.shape == (B, 4, 64)
                    assert_exact(batch, reference)
                received.extend(batches)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            failures.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures and len(received) >= 8
    assert server.errors == []
    # The shared cursor hands each batch to one client: no index twice, none skipped, each served once.
    indices = sorted(batch.index for batch in received)
    assert indices == list(range(indices[0], indices[0] + len(received)))
    assert server.stats["batches"] - served == len(received)


def test_server_survives_a_client_that_disconnects_mid_stream(server, reference):
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    connection.request("GET", f"/activations/stream?batch_size={B}&max_batches=1000")
    response = connection.getresponse()
    assert response.status == 200 and len(response.read(5000)) == 5000
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    client = ActivationClient(server.url)
    assert client.health()["status"] == "ok"
    assert_exact(client.tensor(B, index=1), reference)


def test_streamed_batches_reuse_memory_only_once_let_go():
    info = {"dtype": "float32", "n_layers": 4, "d_model": 64}
    memory = Recycler(16 + 2 * B * 4 * 64 * 4)  # a frame's header, then its batch
    block = memory.block()
    first = to_batch(memory.array(block, 2 * B * 4 * 64 * 4, 16), B, 0, info)
    address = block.ctypes.data
    assert first.resid_mid.data_ptr() == address + 16
    mlp_out = first.mlp_out
    del first, block
    second = memory.block()  # mlp_out still views the first block: new memory
    assert second.ctypes.data != address and not memory.free
    del mlp_out
    assert [array.ctypes.data for array in memory.free] == [address]  # the first block came back
    assert memory.block().ctypes.data == address


def test_shm_batches_are_their_slots_until_garbage_collected(buffer_path, reference):
    with serve(buffer_path) as handle:
        client = ActivationClient(handle.url)
        stream = client.stream(B, 3, transport="shm")
        first = next(stream)
        ring = handle._state.rings[B]
        slot = ring._array[ring._state.index("leased")]
        assert first.resid_mid.untyped_storage().nbytes() == 2 * B * 4 * 64 * 4 and ring.kept == 1
        assert torch.equal(first.resid_mid.flatten(), torch.from_numpy(slot[: B * 1024].view("float32")))
        assert_exact(first, reference)
        mlp_out = first.mlp_out
        del first
        gc.collect()
        time.sleep(0.3)
        assert ring.kept == 1  # a tensor of the batch is alive: its slot stays leased
        del mlp_out
        assert wait_until(lambda: ring.kept == 0)  # given back by the garbage collector's release
        rest = list(stream)
        assert [len(rest), ring.kept] == [2, 2]
        for batch in rest:
            assert_exact(batch, reference)
        del rest, batch
        assert wait_until(lambda: ring.kept == 0)


def test_shm_copies_batches_when_the_ring_is_short_of_slots(buffer_path, reference):
    with serve(buffer_path) as handle:
        held = list(ActivationClient(handle.url).stream(B, 9, transport="shm"))  # more than the 4 slots
        ring = handle._state.rings[B]
        # 3 batches kept their slots; the other 6 were copied, each slot given back at once.
        assert len(held) == 9 and ring.kept == ring.n_slots - 1
        for batch in held:  # kept slots were not refilled under the batches that view them
            assert_exact(batch, reference)
        del held, batch
        assert wait_until(lambda: ring.kept == 0)
        response = httpx.post(f"{handle.url}/shm/lease", params={"batch_size": B}).json()
        assert response["keep"] is False  # a client that does not ask to keep the slot gets a copy to make


def test_stream_bytes_are_the_same_without_the_socket_extension(buffer_path, server):
    from starlette.testclient import TestClient

    query = f"/activations/stream?batch_size={B}&max_batches=6&index=2"
    through_socket = httpx.get(server.url + query).content
    state = ServerState(DiscSource(buffer_path), Limits(max_stream_batches=10), shared_memory=False)
    with TestClient(create_app(state)) as test_client:  # no uvicorn connection: a plain StreamingResponse
        through_send = test_client.get(query).content
    assert through_socket == through_send
    frames = read_frames(through_socket, 4 * 64 * 4)
    assert [(rows, index) for rows, index, _ in frames] == [(B, i) for i in range(2, 8)]


def test_a_connection_serves_requests_after_a_stream(server, reference):
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    for index in (0, 3):
        connection.request("GET", f"/activations/stream?batch_size={B}&max_batches=2&index={index}")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("transfer-encoding") == "chunked"
        frames = read_frames(response.read(), 4 * 64 * 4)
        assert [index for _, index, _ in frames] == [index, index + 1]
    connection.request("GET", "/health")  # the same connection, still in step
    assert connection.getresponse().status == 200
    connection.close()


def test_stop_ends_a_stream_in_progress(buffer_path):
    handle = serve(buffer_path)
    host, port = handle.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", f"/activations/stream?batch_size={B}&max_batches=1000000")
    response = connection.getresponse()
    assert len(response.read(100_000)) == 100_000  # then the client reads no more: the server's sends block
    start = time.monotonic()
    handle.stop()
    assert time.monotonic() - start < 8 and not handle.running
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        while response.read(2**20):
            pass
    connection.close()


@pytest.mark.parametrize(
    "query, status",
    [
        ("/activations/tensor?batch_size=0", 422),
        ("/activations/tensor?batch_size=abc", 422),
        ("/activations/tensor?batch_size=501", 400),  # more than the buffer holds
        ("/activations/tensor?batch_size=10&index=-1", 422),
        ("/activations/tensor?batch_size=10000000000", 422),  # over any server's limit
        ("/activations?batch_size=400", 413),  # over the JSON cap
        ("/activations/stream?batch_size=10&max_batches=0", 422),
        ("/activations/stream?batch_size=10&max_batches=99999999", 400),
        ("/activations/stream?batch_size=10&index=18446744073709551616", 422),  # past a frame's uint64
        ("POST /shm/lease?batch_size=-3", 422),
        ("POST /shm/lease?batch_size=501", 400),
        ("POST /shm/release", 422),  # no body
    ],
)
def test_bad_parameters_get_a_4xx_with_a_message(server, query, status):
    method, _, query = query.rpartition(" ")
    response = httpx.request(method or "GET", f"{server.url}{query}")
    assert response.status_code == status and response.json()["detail"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok" and server.errors == []


def test_a_token_is_required_off_loopback_and_checked(buffer_path):
    with pytest.raises(ValueError, match="token"):
        serve(buffer_path, host="0.0.0.0")  # refused before anything is bound
    with serve(buffer_path, token="s3cret") as handle:
        assert httpx.get(f"{handle.url}/health").status_code == 401
        assert httpx.get(f"{handle.url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = ActivationClient(handle.url, token="s3cret")
        assert client.health()["status"] == "ok" and client.tensor(B).resid_mid.shape == (B, 4, 64)


def test_stop_frees_the_port_and_shared_memory_and_serving_again_works(buffer_path, reference):
    handle = serve(buffer_path)
    client = ActivationClient(handle.url)
    assert len(list(client.stream(B, 2, transport="shm"))) == 2
    segment = next(iter(handle._state.rings.values())).name
    assert Path("/dev/shm", segment).exists()
    handle.stop()
    handle.stop()  # idempotent
    assert not Path("/dev/shm", segment).exists() and not handle.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", handle.port), timeout=2)  # nobody listens any more
    with socket.socket() as sock:  # and the port can be bound again (SO_REUSEADDR: closed connections linger)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", handle.port))
        sock.listen()
    with serve(buffer_path, port=handle.port) as again:
        assert_exact(ActivationClient(again.url).tensor(B, index=4), reference)


def test_client_reconnects_when_the_server_restarts(buffer_path, reference):
    handle = serve(buffer_path)
    port = handle.port
    client = ActivationClient(handle.url, retry_s=20)
    stream = client.stream(B, 4, index=0, transport="http")
    first = next(stream)
    handle.stop()
    with serve(buffer_path, port=port):
        rest = list(stream)
    assert [b.index for b in [first, *rest]] == [0, 1, 2, 3]
    for batch in rest:
        assert_exact(batch, reference)


def test_dataset_splits_batches_across_dataloader_workers(server, reference):
    dataset = ActivationClient(server.url).dataset(B, max_batches=6)
    assert (dataset.n_layers, dataset.d_model, dataset.layer_start) == (4, 64, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(batches) == 6 and len({int(b.index) for b in batches}) == 6
    for batch in batches:
        assert_exact(batch, reference)


def test_training_reads_from_the_server(server, tmp_path):
    config = TrainConfig(
        transcoder=TranscoderConfig(d_features=16),
        trainer=TrainerConfig(max_steps=3, wandb=False, log_every=1),
        data=DataConfig(batch_size=B),
    )
    dataset = ActivationClient(server.url).dataset(B)
    result = cltlab.train(config, dataset, tmp_path, enable_progress_bar=False)
    assert result.clt.n_layers == 4 and (result.clt_dir / "config.json").exists()


def test_live_mode_serves_the_rows_of_a_direct_harvest(tiny_gpt2):
    seq_len, forward, rows = 16, 2, 24  # 30 rows per forward batch: batches straddle forward batches
    ids = list(token_sequences("shakespeare", tiny_gpt2.tokenizer, seq_len=seq_len,
                               bos_token_id=tiny_gpt2.bos_token_id, batch_size=forward))[:3]  # fmt: skip
    direct = [trace_sites(tiny_gpt2, x, 0, 4) for x in ids]  # before the live harvester uses the model
    expected = [torch.cat([a[i][:, 1:].reshape(-1, 4, 64) for a in direct]) for i in range(2)]
    source = LiveSource(
        tiny_gpt2, seq_len=seq_len, batch_size=forward, capacity=64, shuffle_rows=0, repeat=False
    )
    with serve(source) as handle:
        client = ActivationClient(handle.url)
        info = client.wait_for_data(timeout=30)
        assert info["kind"] == "live" and info["n_tokens"] is None and info["normalization"] is not None
        assert info["origin"] == {"model": "tiny-gpt2", "corpus": "shakespeare", "seq_len": seq_len}
        batches = list(client.stream(rows, 3, transport="http"))
        assert [b.index for b in batches] == [0, 1, 2]
        assert torch.equal(torch.cat([b.resid_mid for b in batches]), expected[0][: 3 * rows])
        assert torch.equal(torch.cat([b.mlp_out for b in batches]), expected[1][: 3 * rows])
        assert httpx.get(f"{handle.url}/activations/tensor?batch_size=4&index=0").status_code == 400


def test_live_mode_mixes_rows_of_many_sequences_serves_each_once_and_normalizes_from_the_pool(tiny_gpt2):
    from cltlab.sites import NormAccumulator

    seq_len, forward, pool = (
        16,
        2,
        120,
    )  # 15 rows per sequence, 30 per forward batch; the pool holds 8 sequences
    ids = list(token_sequences("shakespeare", tiny_gpt2.tokenizer, seq_len=seq_len,
                               bos_token_id=tiny_gpt2.bos_token_id, batch_size=forward))[:12]  # fmt: skip
    direct = [[x[:, 1:].reshape(-1, 4 * 64) for x in trace_sites(tiny_gpt2, b, 0, 4)[:2]] for b in ids]
    resid, out = (torch.cat([d[i] for d in direct]) for i in range(2))  # (360, 256) in harvest order

    def served(seed: int) -> tuple[list[torch.Tensor], object]:
        source = LiveSource(tiny_gpt2, seq_len=seq_len, batch_size=forward, shuffle_rows=pool, seed=seed)
        try:
            batches = [source.take(32).data.view(np.float32).reshape(2, 32, -1) for _ in range(5)]
            return [torch.from_numpy(b.copy()) for b in batches], source.stats
        finally:
            source.close()

    batches, stats = served(seed=0)
    rows = []
    for batch in batches:  # each served row is a harvested row (to float rounding: another thread ran it)
        distance, row = torch.cdist(batch[0], resid).min(1)
        assert (distance < 1e-3).all()
        torch.testing.assert_close(batch[1], out[row], atol=1e-4, rtol=1e-4)  # with its own mlp_out
        assert len(set((row // (seq_len - 1)).tolist())) >= 6  # harvest order gives 3 sequences per batch
        rows += row.tolist()
    # Each harvested row served once at most (some contexts repeat in the corpus: count them as one kind each),
    # and none from beyond the pool and the rows harvested since.
    kind = (torch.cdist(resid, resid) < 1e-3).float().argmax(1)  # the first row alike
    served_kinds = torch.bincount(kind[rows], minlength=len(resid))
    assert (
        len(rows) == 160 and (served_kinds <= torch.bincount(kind[: pool + 160], minlength=len(resid))).all()
    )
    # The statistics: every row harvested until the pool first overflowed (5 forward batches = 150 rows).
    norms = NormAccumulator(4, 64)
    for resid, out in direct[:5]:
        norms.add(0, resid.view(-1, 4, 64))
        norms.add(1, out.view(-1, 4, 64))
    for got, want in zip(stats, norms.stats(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    again, _ = served(seed=0)
    other, _ = served(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # the seed fixes the order
    assert not torch.equal(batches[0], other[0])


def test_the_row_mixer_passes_every_row_once():
    from cltlab.server.sources import RowMixer

    mixer = RowMixer(size=10, seed=3)
    rows = np.arange(2 * 37 * 1).reshape(2, 37, 1)  # site 1 = site 0 + 37: the sites stay paired
    out = [mixer.add(rows[:, :4]), mixer.add(rows[:, 4:7]), mixer.add(rows[:, 7:30]), mixer.add(rows[:, 30:])]
    assert [o.shape[1] for o in out] == [0, 0, 20, 7]  # nothing leaves before the pool is full
    everything = np.concatenate([*out, mixer.drain()], axis=1)
    assert sorted(everything[0, :, 0]) == list(range(37)) and (everything[1] == everything[0] + 37).all()
    assert list(everything[0, :, 0]) != list(range(37))
    assert mixer.drain().shape[1] == 0
    assert RowMixer(0).add(rows) is rows  # size 0: the harvest order


def test_serve_builds_a_live_source_from_a_model_and_harvest_config(tiny_gpt2):
    from cltlab.server.runner import as_source

    config = cltlab.config.HarvestConfig(model="tiny-gpt2", seq_len=8, batch_size=1, layers=(1, 3))
    default = as_source(tiny_gpt2, config)  # serve(model, live=config)
    default.close()
    assert default._mixer.size == 65536  # the default pool
    source = LiveSource.from_config(tiny_gpt2, config, shuffle_rows=20)
    try:
        assert (source.seq_len, source.forward_batch, source.info.n_layers, source.info.layer_start) == (
            8,
            1,
            2,
            1,
        )
        assert source.take(7).rows == 7 and source._mixer.size == 20
    finally:
        source.close()


def test_cli_serves_a_folder(buffer_path, capsys):
    from cltlab.cli import main

    assert main(["serve", "--buffer", str(buffer_path), "--port", "0", "--seconds", "0.3"]) == 0
    assert "serving DiscBuffer" in capsys.readouterr().out
