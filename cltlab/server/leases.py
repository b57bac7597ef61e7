"""The client's side of shared-memory leases, and its raw HTTP connections.

A kept lease lets a batch view its shared-memory slot in place; the server reclaims any lease that is neither
renewed nor released within its ``expires_s``. So while such a batch lives, a ``Renewer`` (one daemon thread per
server, ending when no lease is left) renews its lease every third of that time, and when the garbage collector
takes the batch, ``give_back`` releases it from a daemon thread (a finalizer must not wait on I/O).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse


def connection(url: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to ``url``'s host over the scheme it names (TLS for ``https``)."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout)


def give_back(url: str, headers: dict, lease: str) -> None:
    """Release a kept slot. Called by the garbage collector, which must not wait on I/O: a daemon thread sends it."""
    Renewer.of(url, headers).discard(lease)
    threading.Thread(
        target=post,
        args=(url, headers, "/shm/release", {"leases": [lease]}),
        name="cltlab-shm-release",
        daemon=True,
    ).start()


def post(url: str, headers: dict, path: str, body: dict) -> dict | None:
    """POST ``body`` as JSON; the answer's JSON, or None when the server is gone (and its rings with it)."""
    link = connection(url, timeout=10)
    try:
        link.request(
            "POST", path, body=json.dumps(body), headers={**headers, "Content-Type": "application/json"}
        )
        response = link.getresponse()
        answer = response.read()
        return json.loads(answer) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        link.close()


class Renewer:
    """Renews the kept leases of one server while their batches live (the server reclaims a lease that is
    neither renewed nor released within its ``expires_s``), from a daemon thread that ends when none is left."""

    _lock = threading.Lock()
    _all: dict[tuple, Renewer] = {}

    @classmethod
    def of(cls, url: str, headers: dict) -> Renewer:
        with cls._lock:
            key = (url, tuple(sorted(headers.items())))
            if key not in cls._all:
                cls._all[key] = cls(url, headers)
            return cls._all[key]

    def __init__(self, url: str, headers: dict):
        self.url, self.headers = url, headers
        self.leases: dict[str, float] = {}  # lease id → its expires_s
        self.thread: threading.Thread | None = None

    def add(self, lease: str, expires_s: float) -> None:
        with self._lock:
            self.leases[lease] = expires_s
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="cltlab-shm-renew", daemon=True)
                self.thread.start()

    def discard(self, lease: str) -> None:
        with self._lock:
            self.leases.pop(lease, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self.leases:
                    self.thread = None
                    return
                period = min(self.leases.values()) / 3
            time.sleep(period)
            with self._lock:
                leases = list(self.leases)
            answer = post(self.url, self.headers, "/shm/renew", {"leases": leases}) if leases else None
            if answer is not None:
                for lease, renewed in zip(leases, answer["renewed"], strict=True):
                    if not renewed:
                        self.discard(lease)
