"""``serve``: the activation server in a daemon thread of this process (a Jupyter kernel, or ``cltlab serve``).

uvicorn runs on its own event loop in a daemon thread; ``serve`` binds the socket itself (so a busy port or a
bad address fails in the caller, and ``port=0`` picks a free port) and returns once the server accepts
connections. ``stop()`` ends the server, frees the port and unlinks the shared memory; it is idempotent and
also runs at interpreter exit. Errors in the server thread, the live harvester or a request are logged to the
``cltlab`` logger as they happen and re-raised by ``raise_errors()`` and ``stop()``.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import secrets
import socket
import threading
import time
import weakref
from pathlib import Path

from ..buffer import DiscBuffer
from .app import create_app
from .protocol import Limits, Source
from .sources import DiscSource, LiveSource
from .state import ServerState
from .wire import with_socket

log = logging.getLogger("cltlab")

_RUNNING: weakref.WeakSet[ServerHandle] = weakref.WeakSet()
_ATEXIT = False


def is_loopback(address: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1): decided from the address a socket is bound to, never from
    a name (``localhost`` may resolve anywhere)."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, address: str, names: tuple[str, ...]) -> set[str] | None:
    """The Host header names a server bound to ``address`` answers to (None: any, for a wildcard address, where
    the token is the boundary)."""
    if ipaddress.ip_address(address.split("%")[0]).is_unspecified:
        return None
    shown = f"[{address}]" if ":" in address else address
    return {"localhost", "127.0.0.1", "[::1]", host.lower(), f"[{host.lower()}]", shown, *names}


def as_source(source, live=None) -> Source:
    """A source from what ``serve`` was given."""
    if isinstance(source, Source):
        return source
    if isinstance(source, DiscBuffer):
        return DiscSource(source.path, seed=source.seed)
    if isinstance(source, str | Path):
        return DiscSource(source)
    if hasattr(source, "envoy_blocks"):  # a LoadedModel: live mode
        return LiveSource(source) if live is None else LiveSource.from_config(source, live)
    raise TypeError(
        f"serve() takes a harvest folder, a DiscBuffer, a LoadedModel (live mode) or a Source, not "
        f"{type(source).__name__}."
    )


class ServerHandle:
    """A running activation server.

    Attributes:
        url: base URL, e.g. ``http://127.0.0.1:8765``.
        host, port: where it listens.
        token: the bearer token clients must send (None on loopback without one).
        source: what it serves (``DiscSource`` or ``LiveSource``).
    """

    def __init__(self, state: ServerState, sock: socket.socket, host: str, *, log_level: str = "warning"):
        import uvicorn

        self._state, self._socket, self.source, self.token = state, sock, state.source, state.token
        self.host, self.port = host, sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        config = uvicorn.Config(
            with_socket(create_app(state)),
            log_level=log_level,
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"cltlab-server-{self.port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as err:  # noqa: BLE001 - re-raised by raise_errors()
            log.error("The activation server at %s stopped: %s", self.url, err)
            self._error = err

    def _wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"The activation server did not start: {self._error or 'timed out'}")
            time.sleep(0.01)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def stats(self) -> dict:
        """Batches and bytes served, seconds up, GB/s, buffer fill, errors so far."""
        return self._state.stats().model_dump()

    @property
    def errors(self) -> list[BaseException]:
        """Errors of the server thread, the source and requests, oldest first."""
        found = [e for e in (self._error, self.source.error) if e is not None]
        return found + list(self._state.errors)

    def raise_errors(self) -> None:
        """Raise the first error the server ran into, if any."""
        if self.errors:
            raise RuntimeError(
                f"The activation server at {self.url} failed: {self.errors[0]}"
            ) from self.errors[0]

    def stop(self) -> None:
        """Stop serving, free the port and the shared memory; then raise the first error the server ran into."""
        if not self._stopped:
            self._stopped = True
            self._server.should_exit = True
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=5)
            self._socket.close()
            self._state.close()
            self.source.close()
            _RUNNING.discard(self)
            log.info("Stopped the activation server at %s", self.url)
        self.raise_errors()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ServerHandle({self.url}, {state}, {self.source.info.description})"


def _stop_all() -> None:
    for handle in list(_RUNNING):
        try:
            handle.stop()
        except Exception as err:  # noqa: BLE001 - at exit, report and go on
            log.warning("While stopping %s: %s", handle.url, err)


def serve(
    source,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | bool | None = None,
    live=None,
    shared_memory: bool = True,
    limits: Limits | None = None,
    hosts: tuple[str, ...] = (),
    log_level: str = "warning",
) -> ServerHandle:
    """Start an activation server in a daemon thread and return its handle once it accepts connections.

    ``source``: a harvest folder or DiscBuffer (disc mode), or a LoadedModel (live mode; ``live`` is a
    HarvestConfig giving corpus, seq_len, forward batch size, layers and dtype). ``port=0`` picks a free port.
    ``token``: the bearer token clients must send (``True``: make one, see ``handle.token``); required unless the
    bound address is loopback. ``limits``: the budgets (see ``Limits``). ``hosts``: names, besides the bound
    address and localhost, that requests may give in their Host header.
    """
    if token is True:
        token = secrets.token_urlsafe(32)
    global _ATEXIT
    sock = _bind(host, port)
    address = sock.getsockname()[0]
    if not is_loopback(address) and not token:
        sock.close()
        raise ValueError(
            f"{host!r} is bound to {address}, which exposes the server beyond this machine; pass token=... "
            "(clients send it as 'Authorization: Bearer <token>') or bind 127.0.0.1."
        )
    try:
        source = as_source(source, live)
    except BaseException:
        sock.close()
        raise
    state = ServerState(
        source, limits or Limits(), token=token or None, shared_memory=shared_memory,
        allowed_hosts=allowed_hosts(host, address, tuple(name.lower() for name in hosts)),
    )  # fmt: skip
    handle = ServerHandle(state, sock, host, log_level=log_level)
    _RUNNING.add(handle)
    if not _ATEXIT:  # registered on first use, not at import
        atexit.register(_stop_all)
        _ATEXIT = True
    handle._wait_started()
    log.info("Serving %s at %s", source.info.description, handle.url)
    return handle


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on the first address ``host`` resolves to (asyncio then sets TCP_NODELAY)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise OSError(f"Cannot resolve the host {host!r} ({err.strerror}).") from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(
            f"Cannot listen on {host}:{port} ({err.strerror}); choose another port or port=0."
        ) from err
    return sock
