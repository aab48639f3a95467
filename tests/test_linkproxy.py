"""The shaped link proxy (``evc_sim.linkproxy``) on loopback: its bandwidth limit and delay hold,
per direction, and bytes arrive whole and in order."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from evc_sim.linkproxy import LinkProxy

PAYLOAD = bytes(range(256)) * 2048  # 512 KiB


@pytest.fixture()
def sender() -> Iterator[int]:
    """A server that answers every connection's first byte with PAYLOAD."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1)
                conn.sendall(PAYLOAD)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def _fetch(port: int) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"x")
        data = b""
        while len(data) < len(PAYLOAD):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data, time.perf_counter() - t0


@pytest.mark.parametrize(("rate", "delay_ms", "directions", "low", "high"), [
    (20.0, 5.0, "down", 0.2, 0.6),   # 512 KiB at 20 Mbit/s: 0.21 s, + 5 ms
    (20.0, 5.0, "up", 0.0, 0.15),    # only the 1-byte request is shaped: a few ms
    (None, 50.0, "both", 0.1, 0.4),  # no rate limit, 2 × 50 ms
])  # fmt: skip
def test_rate_and_delay(sender: int, rate: float | None, delay_ms: float, directions: str, low: float, high: float
                        ) -> None:  # fmt: skip
    proxy = LinkProxy(("127.0.0.1", sender), rate, delay_ms, directions)
    port = proxy.start()
    try:
        data, seconds = _fetch(port)
    finally:
        proxy.stop()
    assert data == PAYLOAD
    assert low <= seconds <= high, seconds
