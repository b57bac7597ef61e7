"""stream/direct and shm/direct: activation-server GB/s received by a client ÷ DiscBuffer direct-read GB/s.

A one-shard harvest folder shaped like smollm2-135m (30 layers × d_model 576, bfloat16; see benchmarks/buffer.py)
is filled with random data and read once to warm the page cache. Then, side by side in this run, best of three
each: one epoch of DiscBuffer batches read directly; the same number of batches received by an ActivationClient
over ``/activations/stream`` (HTTP on loopback); and over the shared-memory ring. The server runs in this process,
as it does in a notebook's kernel. No consumer touches the data: direct reads land in fresh arrays, streamed
batches in arrays the client recycles from batches already let go, shared-memory batches are the ring's slots.
Goals: stream/direct >= 0.5, shm/direct >= 0.8. Also the stream as a plain StreamingResponse (the path taken under a
uvicorn the direct socket writes were not tested with), to see what those writes are worth, and the stream's own
ceiling: the same bytes, batch by batch, between two plain loopback TCP sockets in this process (a sender thread's
``sendall``, the receiver's ``recv_into`` a recycled buffer; no HTTP, no disc): ``stream/loopback`` (goal >= 0.85).
Usage: python benchmarks/server.py [--rows 16384] [--batch-size 1024]
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
from pathlib import Path

from buffer import best_of, make_folder, shape_arguments

from cltlab import ActivationClient, DiscBuffer, serve
from cltlab.server import wire


def consume(batches) -> None:
    """Take each batch and let it go, as a training loop does."""
    for _ in batches:
        pass


def loopback(n_batches: int, batch_bytes: int) -> None:
    """Send ``n_batches`` blocks of ``batch_bytes`` from a thread to this one over loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        payload = bytes(batch_bytes)

        def send() -> None:
            with socket.create_connection(server.getsockname()) as sender:
                for _ in range(n_batches):
                    sender.sendall(payload)

        thread = threading.Thread(target=send)
        thread.start()
        receiver, _ = server.accept()
        block = memoryview(bytearray(batch_bytes))
        with receiver:
            for _ in range(n_batches):
                got = 0
                while got < batch_bytes:
                    got += receiver.recv_into(block[got:])
        thread.join()


def main() -> None:
    args = shape_arguments(__doc__)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(folder, args.rows, args.layers, args.d_model)
        buffer = DiscBuffer(folder, batch_size=args.batch_size)
        n = len(buffer)
        nbytes = sum(
            a.numel() * a.element_size()
            for i in range(n)
            for a in buffer[i][:2]  # resid_mid, mlp_out
        )  # also warms the cache
        direct = best_of(3, lambda: consume(buffer[i] for i in range(n)))
        with serve(folder) as handle:
            client = ActivationClient(handle.url)
            list(client.stream(args.batch_size, 2, transport="http"))  # warm up both paths
            list(client.stream(args.batch_size, 2, transport="shm"))
            stream = best_of(3, lambda: consume(client.stream(args.batch_size, n, transport="http")))
            shm = best_of(3, lambda: consume(client.stream(args.batch_size, n, transport="shm")))
            client.close()
        wire.supported = lambda: False  # the same stream as a plain StreamingResponse through uvicorn
        with serve(folder) as handle:
            client = ActivationClient(handle.url)
            list(client.stream(args.batch_size, 2, transport="http"))
            plain = best_of(3, lambda: consume(client.stream(args.batch_size, n, transport="http")))
            client.close()
        sockets = best_of(3, lambda: loopback(n, nbytes // n))
    gb = nbytes / 1e9
    print(f"{n} batches of {args.batch_size} rows, {gb:.2f} GB per pass")
    print(f"DiscBuffer direct: {gb / direct:.2f} GB/s")
    print(f"server /activations/stream: {gb / stream:.2f} GB/s")
    print(f"server /activations/stream without direct socket writes: {gb / plain:.2f} GB/s")
    print(f"server shared memory: {gb / shm:.2f} GB/s")
    print(f"two plain loopback sockets: {gb / sockets:.2f} GB/s")
    print(f"stream/direct = {direct / stream:.2f}")
    print(f"shm/direct = {direct / shm:.2f}")
    print(f"stream/loopback = {sockets / stream:.2f}")
    print(
        f"plain stream/stream = {stream / plain:.2f} (direct socket writes: the stream's path under a tested uvicorn)"
    )


if __name__ == "__main__":
    main()
