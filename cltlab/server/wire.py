"""A streamed body written straight to the connection's socket, past the ASGI server's write path.

Through uvicorn (h11 on asyncio), each body message is copied again before the kernel sees it (h11 joins the
chunk framing and the data into new bytes; asyncio keeps what the socket did not take at once in a buffer of
its own) and crosses from a worker thread to the event loop, which holds ``/activations/stream`` to a fraction
of what loopback TCP carries. So ``with_socket`` wraps the app and, for HTTP/1.1 requests on a uvicorn
connection, offers the connection's transport in ``scope["extensions"]["cltlab.socket"]``. ``SocketStream``
then sends its status and headers the ASGI way, pauses the transport, writes the chunked body itself from one
worker thread (``sendmsg`` of the frames' own memory, ``PIECE`` bytes per call, no copy in Python), resumes
the transport and lets the server write the last chunk, so the connection stays usable. Without the extension
(another ASGI server, a uvicorn outside ``TESTED_UVICORN``, a test client) it is a StreamingResponse of the same
bytes; the tests check both give the same bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import os
import socket
import time
from collections.abc import Callable, Generator, Iterable, Iterator

import anyio
import anyio.to_thread
from starlette.responses import StreamingResponse

from ..buffer import read_into
from .protocol import FRAME, FileRange

EXTENSION = "cltlab.socket"
PIECE = 2**20  # bytes per socket write (and per message without the extension)
SEND_TIMEOUT_S = 600.0  # a client that reads nothing for this long is dropped (it reconnects if alive)


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


TESTED_UVICORN = ((0, 54), (0, 55))  # [from, to): the uvicorn versions whose internals this was tested with


def supported() -> bool:
    """True when the installed uvicorn is one this module was tested with (``pyproject.toml`` pins the range)."""
    try:
        version = tuple(int(part) for part in importlib.metadata.version("uvicorn").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return TESTED_UVICORN[0] <= version < TESTED_UVICORN[1]


def with_socket(app):
    """``app`` with uvicorn's connection offered to responses in ``scope["extensions"]["cltlab.socket"]``; ``app``
    itself (every stream a plain StreamingResponse) under a uvicorn this module was not tested with."""
    if not supported():
        return app

    async def offer(scope, receive, send):
        # uvicorn calls the app with the bound method ``send`` of its RequestResponseCycle, which has the transport.
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if (
            scope["type"] == "http"
            and scope.get("http_version") == "1.1"
            and isinstance(transport, asyncio.Transport)
            and transport.get_extra_info("socket") is not None
        ):
            extensions = {**scope.get("extensions", {}), EXTENSION: {"transport": transport}}
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return offer


class SocketStream(StreamingResponse):
    """A chunked response of ``frames``: each frame a list of buffers, sent back to back as one HTTP chunk."""

    def __init__(
        self,
        frames: Generator[list, None, None],
        *,
        headers: dict[str, str],
        media_type: str,
        release: Callable[[], None] = lambda: None,
    ):
        self.frames, self.release = frames, release
        super().__init__(_pieces(frames), headers=headers, media_type=media_type)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self._send(scope, receive, send)
        finally:
            with contextlib.suppress(
                ValueError
            ):  # still running in an abandoned writer thread: it closes them
                self.frames.close()
            self.release()  # the frames' memory is free again  # the frames' memory is free again

    async def _send(self, scope, receive, send) -> None:
        transport = scope.get("extensions", {}).get(EXTENSION, {}).get("transport")
        if transport is None:
            await super().__call__(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        transport.pause_reading()  # the event loop leaves the socket alone while the worker thread writes
        sock = None
        try:
            deadline = time.monotonic() + SEND_TIMEOUT_S
            while transport.get_write_buffer_size():  # the headers go first
                if time.monotonic() > deadline:
                    raise ClientGone("the client read nothing")
                await asyncio.sleep(0.001)
            sock = _duplicate(transport)  # closed by _write
            sock.settimeout(SEND_TIMEOUT_S)
            # Its own limiter: a long stream must not hold one of the tokens that the sync endpoints share.
            await anyio.to_thread.run_sync(
                _write, sock, self.frames, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
            )
        except ClientGone:  # it went away (or stopped reading for SEND_TIMEOUT_S)
            transport.abort()
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        except BaseException:  # the server stops, or the source failed: end the connection, and so the writer
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed by a writer that failed
                    sock.shutdown(socket.SHUT_RDWR)
            raise
        transport.resume_reading()
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # h11 ends the chunks


def ranged_stream(
    state, ranges, batch_size: int, count: int, index: int | None, nbytes: int, *, headers: dict[str, str]
) -> SocketStream:
    """A disc source's stream of ``nbytes``-byte batches: every batch goes out by ``sendfile`` as byte ranges of its
    shard files, never read into this process. The first batch's ranges are found before the 200, so a bad request
    fails first."""
    reservation = state.reserve(nbytes, stream=True)
    opened = contextlib.ExitStack()
    try:
        first = opened.enter_context(ranges(batch_size, index))
    except BaseException:
        reservation.release()
        raise

    def frame(ranged) -> list:
        state.count(ranged.nbytes)
        return [FRAME.pack(ranged.rows, ranged.index), *ranged.parts]

    def frames():
        with opened:  # the first batch's files stay open until it is sent
            yield frame(first)
        for k in range(1, count):
            with ranges(batch_size, None if index is None else index + k) as ranged:
                yield frame(ranged)

    def release() -> None:
        opened.close()  # a stream that never started still lets go of the first batch's files
        reservation.release()

    return SocketStream(frames(), release=release, media_type="application/octet-stream", headers=headers)


def _duplicate(transport: asyncio.Transport) -> socket.socket:
    """A socket of the transport's connection that a worker thread may write to, or ``ClientGone`` when the client
    has already closed it (the server then has no descriptor left to duplicate)."""
    if transport.is_closing():
        raise ClientGone("the client closed the connection")
    try:
        return socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    except OSError as err:
        raise ClientGone(err) from err


def _write(sock: socket.socket, frames: Generator[list, None, None]) -> None:
    """Each frame as one HTTP chunk (size line, parts, CRLF); closes ``sock`` (a duplicate) and ``frames``.
    A part is a buffer, or a ``FileRange`` sent by ``sendfile`` (the kernel copies it from the page cache)."""
    # Closed here, not later by the garbage collector in the event loop's thread.
    with sock, contextlib.closing(frames):
        for frame in frames:
            size = sum(
                part.nbytes if isinstance(part, FileRange) else memoryview(part).nbytes for part in frame
            )
            views = [memoryview(b"%x\r\n" % size)]
            for part in frame:
                if isinstance(part, FileRange):
                    _send_all(sock, views)
                    _send_file(sock, part)
                    views = []
                else:
                    views.append(memoryview(part).cast("B"))
            _send_all(sock, [*views, memoryview(b"\r\n")])


def _send_file(sock: socket.socket, part: FileRange) -> None:
    """``part``'s bytes with ``sendfile`` (within the socket's timeout); a file shorter than it is an error."""
    with os.fdopen(part.fd, "rb", buffering=0, closefd=False) as file:
        try:
            sent = sock.sendfile(file, part.offset, part.nbytes)
        except OSError as err:  # reset, closed, or timed out
            raise ClientGone(err) from err
    if sent != part.nbytes:
        raise ValueError(f"Unexpected end of file at byte {part.offset + sent}: the shard is truncated.")


def _send_all(sock: socket.socket, views: list[memoryview]) -> None:
    """Send ``views`` back to back with ``sendmsg``, at most PIECE bytes per call."""
    queue = collections.deque(view for view in views if view.nbytes)
    while queue:
        batch, size = [], 0
        while queue and size < PIECE:
            view = queue.popleft()
            take = min(view.nbytes, PIECE - size)
            if take < view.nbytes:
                queue.appendleft(view[take:])
            batch.append(view[:take])
            size += take
        try:
            sent = sock.sendmsg(batch)
        except OSError as err:  # reset, closed, or timed out
            raise ClientGone(err) from err
        unsent = []
        for view in batch:
            if sent >= view.nbytes:
                sent -= view.nbytes
            else:
                unsent.append(view[sent:])
                sent = 0
        queue.extendleft(reversed(unsent))


def _pieces(frames: Iterable[list]) -> Iterator[memoryview]:
    """The frames' bytes in messages of at most PIECE bytes (asyncio before Python 3.12 trims its write buffer
    from the front after every send, which makes one large write quadratic)."""
    for frame in frames:
        for part in frame:
            if isinstance(part, FileRange):
                yield from _file_pieces(part)
                continue
            view = memoryview(part).cast("B")
            for start in range(0, view.nbytes, PIECE):
                yield view[start : start + PIECE]


def _file_pieces(part: FileRange) -> Iterator[memoryview]:
    """``part``'s bytes read as the DiscBuffer reads them (``read_into``), ``PIECE`` at a time (for a stream
    without the socket)."""
    for start in range(0, part.nbytes, PIECE):
        piece = bytearray(min(PIECE, part.nbytes - start))
        read_into(part.fd, piece, part.offset + start)
        yield memoryview(piece)
