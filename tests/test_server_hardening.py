"""The activation server against hostile or unlucky requests (issue 11, points 7–13): each test failed before.

Every server here runs on loopback in this process; the batches it serves are compared byte for byte with the
DiscBuffer read directly.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import assert_exact, wait_until

from cltlab import DiscBuffer
from cltlab.server import ActivationClient, DiscSource, Limits, Source, serve
from cltlab.server.protocol import NoData, SourceInfo, WireBatch

B = 100  # rows per batch: the 500-row buffer holds 5 batches
ROW_BYTES = 4 * 64 * 4  # tiny-gpt2: 4 layers × d_model 64, float32


@pytest.fixture(scope="module")
def reference(buffer_path):
    buffer = DiscBuffer(buffer_path, batch_size=B)
    return [buffer[i] for i in range(len(buffer))]


def segments() -> set[str]:
    """This process's shared-memory segments."""
    return {p.name for p in Path("/dev/shm").glob(f"cltlab-{os.getpid()}-*")}


class FlakySource:
    """A Source of batches whose every byte is ``index % 251``; ``take`` raises ``failure`` while ``failing``."""

    info = SourceInfo("disc", "flaky test source", 2, 4, 0, "float32", 1000)
    stats = None
    alive = True
    error = None

    def __init__(self, failure: BaseException):
        self.failure, self.failing, self.taken = failure, False, 0

    def check(self, batch_size: int, index: int | None = None) -> None:
        DiscSource.check(self, batch_size, index)

    def take(self, batch_size: int, index: int | None = None, out: np.ndarray | None = None) -> WireBatch:
        if self.failing:
            raise self.failure
        index = self.taken if index is None else index
        self.taken += 1
        data = np.full(self.info.batch_bytes(batch_size), index % 251, np.uint8)
        return WireBatch(index, batch_size, data)

    def fill(self) -> float:
        return 1.0

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- 7. protocol


def test_the_client_needs_neither_the_app_nor_fastapi(monkeypatch):
    """What ``import cltlab.server.client`` loads (a DataLoader worker imports it): no FastAPI, no app."""
    import importlib

    import cltlab

    heavy = ("cltlab.server", "fastapi", "uvicorn")
    for name in [n for n in sys.modules if n.startswith(heavy)]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test, as the other tests know them
    monkeypatch.delattr(cltlab, "server", raising=False)
    importlib.import_module("cltlab.server.client")
    assert "cltlab.server.protocol" in sys.modules
    assert not [name for name in sys.modules if name.startswith(("cltlab.server.app", "fastapi", "uvicorn"))]
    for name in [n for n in sys.modules if n.startswith(heavy)]:
        del sys.modules[name]  # the copies imported here


def test_replies_are_typed_in_the_openapi_document_and_any_source_can_be_served(buffer_path):
    assert isinstance(DiscSource(buffer_path), Source)
    with serve(FlakySource(RuntimeError())) as handle:
        schemas = httpx.get(f"{handle.url}/openapi.json").json()["components"]["schemas"]
        assert {"Info", "Limits", "LeaseReply", "Health", "Stats", "ErrorReply"} <= set(schemas)
        assert httpx.get(f"{handle.url}/info").json()["limits"]["max_streams"] == Limits().max_streams
        batch = ActivationClient(handle.url).stream(10, 1, transport="shm").__next__()
        assert torch.all(batch.resid_mid.view(torch.uint8) == batch.index % 251)


# ---------------------------------------------------------------------------------------------- 8. validation


def test_a_bad_lease_allocates_nothing_and_breaks_no_batch_size(buffer_path, reference):
    with serve(buffer_path) as handle:
        response = httpx.post(f"{handle.url}/shm/lease", params={"batch_size": 501})
        assert response.status_code == 400 and "500 rows" in response.json()["detail"]
        assert handle.stats["shm_rings"] == [] and not segments()  # checked before a ring was made
        for _ in range(6):  # an old client's pid, too large for os.kill, is ignored; the ring keeps serving
            lease = httpx.post(f"{handle.url}/shm/lease", params={"batch_size": B, "pid": 2**31}).json()
            assert httpx.post(f"{handle.url}/shm/release", json={"leases": [lease["lease"]]}).json() == {
                "released": [True]
            }
        assert_exact(next(ActivationClient(handle.url).stream(B, 1, transport="shm")), reference)
        assert handle.errors == []


def test_a_ring_whose_source_fails_answers_503_and_keeps_serving():
    source = FlakySource(OSError(errno.EIO, "Input/output error"))
    with serve(source, limits=Limits(lease_s=60)) as handle:
        client = ActivationClient(handle.url, transport="shm")
        assert next(client.stream(10, 1)).index == 0
        source.failing = True
        time.sleep(0.3)  # the ring's ready slots are leased below; its producer now fails
        answers = [httpx.post(f"{handle.url}/shm/lease", params={"batch_size": 10}) for _ in range(6)]
        statuses = [answer.status_code for answer in answers]
        assert 503 in statuses and set(statuses) <= {200, 503}
        assert "Input/output error" in answers[-1].json()["detail"]
        leases = [answer.json()["lease"] for answer in answers if answer.status_code == 200]
        released = httpx.post(f"{handle.url}/shm/release", json={"leases": leases}).json()["released"]
        assert released == [True] * len(leases)
        source.failing = False
        assert wait_until(lambda: handle._state.rings[10].error is None)  # its next batch succeeded
        batches = list(client.stream(10, 3))
        assert all(torch.all(b.resid_mid.view(torch.uint8) == b.index % 251) for b in batches)
        handle._state.errors.clear()


# ---------------------------------------------------------------------------------------------- 9. leases


def test_leases_belong_to_their_holder_and_expire(buffer_path, reference):
    lease_s = 4.0  # long enough that a loaded CI machine does not see the hostile leases expire too early
    with serve(buffer_path, limits=Limits(lease_s=lease_s)) as handle:
        url = f"{handle.url}/shm/lease"
        hostile = [httpx.post(url, params={"batch_size": B, "keep": True, "pid": 1}).json() for _ in range(3)]
        assert [lease["keep"] for lease in hostile] == [True] * 3 and len(
            {lease["lease"] for lease in hostile}
        ) == 3
        ring = handle._state.rings[B]
        honest = ActivationClient(handle.url)
        held = list(
            honest.stream(B, 2, transport="shm")
        )  # copies: the hostile leases keep every keepable slot
        guesses = [str(slot) for slot in range(4)] + [secrets.token_urlsafe(24) for _ in range(4)]
        assert (
            httpx.post(f"{handle.url}/shm/release", json={"leases": guesses}).json()["released"]
            == [False] * 8
        )
        assert (
            httpx.get(f"{handle.url}/shm/release", params={"segment": ring.name, "slot": 0}).status_code
            == 405
        )
        assert ring.leased == 3  # the hostile leases were not released by anyone but their holder...
        assert wait_until(lambda: ring.leased == 0)  # ...and expire, though pid 1 lives
        kept = list(honest.stream(B, 6, transport="shm"))
        assert ring.kept == 3  # the honest client keeps slots again
        time.sleep(2 * lease_s)  # past lease_s: the client renews the leases of the batches it still holds
        list(
            ActivationClient(handle.url).stream(B, 8, transport="shm")
        )  # slots that were reclaimed would refill
        for batch in held + kept:
            assert_exact(batch, reference)
        assert httpx.post(f"{handle.url}/shm/release", json={"leases": [hostile[0]["lease"]]}).json() == {
            "released": [False]
        }


def test_a_lease_answers_at_once_when_every_slot_is_held(buffer_path, reference):
    with serve(
        buffer_path, limits=Limits(lease_s=5)
    ) as handle:  # the 5th lease comes well before they expire
        url = f"{handle.url}/shm/lease"
        for _ in range(4):  # never released, like a client that died
            assert httpx.post(url, params={"batch_size": B, "pid": 2}, timeout=10).status_code == 200
        response = httpx.post(url, params={"batch_size": B, "pid": 2}, timeout=10)
        assert response.status_code == 429 and "leased" in response.json()["detail"]
        batch = next(
            ActivationClient(handle.url, retry_s=20).stream(B, 1, transport="shm")
        )  # after they expire
        assert_exact(batch, reference)


# ---------------------------------------------------------------------------------------------- 10. /dev/shm


def test_a_ring_larger_than_dev_shm_is_a_503_and_the_client_streams_over_http(
    buffer_path, reference, monkeypatch
):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cltlab.server.shm.os.posix_fallocate", no_room)
    with serve(buffer_path) as handle:
        response = httpx.post(f"{handle.url}/shm/lease", params={"batch_size": B})
        assert response.status_code == 503 and response.headers["X-Cltlab-Shm"] == "unavailable"
        assert "no room" in response.json()["detail"] and not segments()
        client = ActivationClient(handle.url)  # transport="auto": shared memory on this host, if it can
        assert client.same_host
        batches = list(client.stream(B, 6))
        assert len(batches) == 6 and len({b.index for b in batches}) == 6
        for batch in batches:
            assert_exact(batch, reference)
        with pytest.raises(RuntimeError, match="no room"):  # asked for explicitly, it says why not
            next(client.stream(B, 1, transport="shm"))
        assert handle.errors == []


def test_segments_are_reserved_when_made(buffer_path, monkeypatch):
    reserved = []
    real = os.posix_fallocate
    monkeypatch.setattr("cltlab.server.shm.os.posix_fallocate", lambda *a: (reserved.append(a[1:]), real(*a)))
    with serve(buffer_path) as handle:
        assert httpx.post(f"{handle.url}/shm/lease", params={"batch_size": B}).status_code == 200
        assert reserved == [(0, 4 * 2 * B * ROW_BYTES)]


# ---------------------------------------------------------------------------------------------- 11. budgets


def test_twenty_concurrent_maximum_size_streams_get_413_or_429_not_memory(buffer_path, reference):
    limits = Limits(
        max_reply_bytes=2 * B * ROW_BYTES, max_streams=2, max_inflight_bytes=8 * 2 * B * ROW_BYTES
    )
    with serve(buffer_path, limits=limits) as handle:
        host, port = handle.url.removeprefix("http://").split(":")
        too_large = httpx.get(f"{handle.url}/activations/tensor", params={"batch_size": B + 1})
        assert too_large.status_code == 413 and "limit" in too_large.json()["detail"]
        connections, answers = [], []
        for _ in range(20):
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.request("GET", f"/activations/stream?batch_size={B}&max_batches=100000")
            response = connection.getresponse()
            answers.append(
                (response.status, response.read(100) if response.status == 200 else response.read())
            )
            connections.append(connection)
        statuses = [status for status, _ in answers]
        assert statuses.count(200) == 2 and statuses.count(429) == 18
        assert all(b"streams" in body for status, body in answers if status == 429)
        tensors = [httpx.get(f"{handle.url}/activations/tensor", params={"batch_size": B}) for _ in range(3)]
        assert {t.status_code for t in tensors} <= {200, 429}
        for connection in connections:
            connection.close()
        assert wait_until(lambda: handle.stats["streams"] == 0 and handle.stats["inflight_bytes"] == 0)
        assert_exact(ActivationClient(handle.url).tensor(B, index=2), reference)


def test_rings_for_unused_batch_sizes_are_freed(buffer_path, reference):
    with serve(buffer_path, limits=Limits(max_rings=2)) as handle:
        client = ActivationClient(handle.url)
        first = segments()
        for size in (10, 20, 30):
            list(client.stream(size, 2, transport="shm"))
            assert wait_until(lambda size=size: handle._state.rings[size].leased == 0)
        assert handle.stats["shm_rings"] == [20, 30] and len(segments() - first) == 2
        held = [httpx.post(f"{handle.url}/shm/lease", params={"batch_size": s}).json() for s in (20, 30)]
        response = httpx.post(f"{handle.url}/shm/lease", params={"batch_size": 40})
        assert response.status_code == 429 and "ring" in response.json()["detail"]  # every ring holds a lease
        httpx.post(f"{handle.url}/shm/release", json={"leases": [lease["lease"] for lease in held]})
        assert_exact(next(client.stream(B, 1, transport="shm")), reference)
        assert handle.stats["shm_rings"] == [30, B]


# ---------------------------------------------------------------------------------------------- 12. buffers


def test_nine_batch_sizes_read_at_once_stay_exact(buffer_path, monkeypatch):
    import cltlab.buffer

    sizes = range(40, 52)  # 12 batch sizes, over the 8 buffers kept open
    expected = {size: [DiscBuffer(buffer_path, batch_size=size)[i] for i in range(3)] for size in sizes}
    read, close, failures = DiscBuffer.read_batch_into, DiscBuffer.close, []
    inside, go = threading.Semaphore(0), threading.Event()

    def held_read(
        self, index, out
    ):  # counts its readers; the first readers wait until the 9th size is opened
        self.readers = getattr(self, "readers", 0) + 1
        try:
            inside.release()
            go.wait(10)
            read(self, index, out)
        finally:
            self.readers -= 1

    def checked_close(self):
        if getattr(self, "readers", 0):
            failures.append(f"a buffer of batch size {self.batch_size} was closed while being read")
        close(self)

    monkeypatch.setattr(cltlab.buffer.DiscBuffer, "read_batch_into", held_read)
    monkeypatch.setattr(cltlab.buffer.DiscBuffer, "close", checked_close)
    source = DiscSource(buffer_path, max_buffers=8)

    def read_size(size: int, times: int) -> None:
        try:
            for k in range(times):
                batch = source.take(size, k % 3)
                sites = torch.from_numpy(batch.data.view(np.float32)).reshape(2, batch.rows, 4, 64)
                want = expected[size][k % 3]
                if not (torch.equal(sites[0], want.resid_mid) and torch.equal(sites[1], want.mlp_out)):
                    failures.append(f"batch size {size}: other bytes")
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            failures.append(f"batch size {size}: {err!r}")

    first = [threading.Thread(target=read_size, args=(size, 1)) for size in sizes[:8]]
    for thread in first:
        thread.start()
    for _ in first:  # eight buffers are being read...
        assert inside.acquire(timeout=10)
    opener = threading.Thread(target=read_size, args=(sizes[8], 1))  # ...when a ninth batch size comes
    opener.start()
    assert inside.acquire(timeout=10)
    go.set()
    rest = [threading.Thread(target=read_size, args=(size, 6)) for size in sizes]  # then all 12 at once
    for thread in rest:
        thread.start()
    for thread in [*first, opener, *rest]:
        thread.join()
    source.close()
    assert failures == []


# ---------------------------------------------------------------------------------------------- 13. security


def test_requests_naming_another_host_are_refused(buffer_path):
    with serve(buffer_path, hosts=("lab.example",)) as handle:
        for host, status in [
            ("evil.example", 421),
            (f"evil.example:{handle.port}", 421),
            (f"localhost:{handle.port}", 200),
            (f"127.0.0.1:{handle.port}", 200),
            ("lab.example", 200),
        ]:
            response = httpx.get(f"{handle.url}/info", headers={"Host": host})
            assert response.status_code == status, host
        assert (
            "does not answer to the host"
            in httpx.get(f"{handle.url}/info", headers={"Host": "x"}).json()["detail"]
        )


def test_a_generated_token_guards_loopback_too(buffer_path):
    with serve(buffer_path, token=True) as handle:
        assert isinstance(handle.token, str) and len(handle.token) >= 32
        assert httpx.get(f"{handle.url}/health").status_code == 401
        assert ActivationClient(handle.url, token=handle.token).health()["status"] == "ok"


def test_loopback_is_decided_by_the_bound_address(buffer_path, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # a 'localhost' that resolves to every interface
        return real("0.0.0.0" if host == "localhost" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(ValueError, match="0.0.0.0"):
        serve(buffer_path, host="localhost")


def test_an_https_url_never_carries_the_token_in_the_clear(buffer_path):
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(5)
            try:
                while chunk := connection.recv(65536):
                    received.extend(chunk)
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    client = ActivationClient(
        f"https://127.0.0.1:{listener.getsockname()[1]}", token="s3cret", retry_s=0, timeout=2
    )
    client._info = {"dtype": "float32", "n_layers": 4, "d_model": 64, "row_bytes": ROW_BYTES}
    with pytest.raises(ConnectionError):
        next(client.stream(B, 1, transport="http"))
    listener.close()
    assert (
        received and b"s3cret" not in received and b"HTTP/1.1" not in received
    )  # a TLS hello, not plain HTTP
    with pytest.raises(ValueError, match="http://"):
        ActivationClient("ftp://127.0.0.1:1")


def test_a_500_answers_with_an_id_and_the_error_list_is_bounded(caplog):
    source = FlakySource(RuntimeError("/home/someone/secret.h5 is unreadable"))
    source.failing = True
    with serve(source, limits=Limits(max_errors=3)) as handle:
        with caplog.at_level(logging.ERROR, logger="cltlab"):
            answers = [
                httpx.get(f"{handle.url}/activations/tensor", params={"batch_size": 4}) for _ in range(5)
            ]
        assert {a.status_code for a in answers} == {500}
        detail = answers[-1].json()["detail"]
        assert "secret" not in detail and "RuntimeError" not in detail
        error_id = detail.split()[2].rstrip(";")
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert len(logged) == 1 and logged[0].exc_info is not None
        assert len(handle.stats["errors"]) == 3
        handle._state.errors.clear()


def test_a_stopped_live_source_is_a_503(buffer_path):
    source = FlakySource(NoData("The live harvester has stopped (the corpus ended); no more batches."))
    source.failing = True
    with serve(source) as handle:
        response = httpx.get(f"{handle.url}/activations/tensor", params={"batch_size": 4})
        assert response.status_code == 503 and "stopped" in response.json()["detail"]


# ---------------------------------------------------------------------------------------------- 14. wire


def test_an_untested_uvicorn_streams_the_same_bytes_without_direct_socket_writes(buffer_path, monkeypatch):
    from cltlab.server import wire

    query = f"/activations/stream?batch_size={B}&max_batches=6&index=2"
    with serve(buffer_path) as handle:
        direct = httpx.get(handle.url + query).content
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.99.0")
    assert not wire.supported()
    sent = []
    monkeypatch.setattr(wire, "_write", lambda *args: sent.append(args))  # the direct path, never taken now
    with serve(buffer_path) as handle:
        assert httpx.get(handle.url + query).content == direct and len(direct) == 6 * (16 + 2 * B * ROW_BYTES)
    assert sent == []


def test_batches_go_out_as_the_byte_ranges_of_their_shards(buffer_path, reference):
    buffer = DiscBuffer(buffer_path, batch_size=B)
    for index in range(len(buffer)):
        with buffer.batch_ranges(index) as ranges:
            data = b"".join(os.pread(fd, nbytes, offset) for fd, offset, nbytes in ranges)
        expected = reference[index]
        sites = (expected.resid_mid, expected.mlp_out)
        assert data == b"".join(site.numpy().tobytes() for site in sites)
    buffer.close()


def test_streams_dropped_before_or_after_their_first_batch_let_go_of_its_files(buffer_path, reference):
    # A disc source's first batch is held open as byte ranges from before the 200 until it is sent.
    with serve(buffer_path) as handle:
        host, port = handle.url.removeprefix("http://").split(":")
        for read in (0, 100, 16 + 2 * B * ROW_BYTES + 100):  # nothing, the headers, past the first frame
            for _ in range(5):
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(f"GET /activations/stream?batch_size={B}&index=0 HTTP/1.1\r\n"
                                 f"Host: {host}\r\n\r\n".encode())  # fmt: skip
                    got = 0
                    while got < read:
                        got += len(sock.recv(read - got)) or read
        assert wait_until(lambda: handle.source._users[B] == 0)  # no request holds the buffer now
        client = ActivationClient(handle.url)
        batches = list(client.stream(B, 3, index=1, transport="http"))
        assert [b.index for b in batches] == [1, 2, 3]
        for batch in batches:
            assert_exact(batch, reference)
        client.close()


def test_a_shard_truncated_while_served_cuts_the_stream_and_the_error_is_reported(buffer_path, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(buffer_path, folder)
    buffer = DiscBuffer(folder, batch_size=B)
    n = len(buffer)

    def ranges(index: int) -> list[tuple[str, int, int]]:
        with buffer.batch_ranges(index) as parts:
            return [(os.readlink(f"/proc/self/fd/{fd}"), offset, size) for fd, offset, size in parts]

    end: dict[str, int] = {}
    for index in range(n):
        for path, offset, size in ranges(index):
            end[path] = max(end.get(path, 0), offset + size)
    shard = max(end, key=end.get)
    cut = end[shard] - ROW_BYTES * B // 2  # the last rows of the largest shard go

    def intact(index: int) -> bool:
        return all(path != shard or offset + size <= cut for path, offset, size in ranges(index))

    first = next(i for i in range(n) if intact(i) and not intact((i + 1) % n))  # whole; the next one is cut
    buffer.close()
    with pytest.raises(RuntimeError, match="the shard is truncated"):
        with serve(folder) as server:
            client = ActivationClient(server.url)
            assert len(list(client.stream(B, n, index=0, transport="http"))) == n  # the shards are open now
            os.truncate(shard, cut)
            got = []
            with pytest.raises(httpx.HTTPError):
                for batch in client.stream(B, 2, index=first, transport="http"):
                    got.append(batch.index)
            assert got == [first]  # whole batches only: the cut one never arrives
            assert client.health()["status"] == "ok"
            client.close()
