"""A userspace TCP proxy that behaves like a slow link: a bandwidth limit (a token bucket per
direction, shared by all connections, as one link is) and a one-way latency, for tests and
benchmarks of collaborative inference between the controller and a device's edge server.

Each chunk read from one side leaves the link when the link has had time to carry it
(``bytes × 8 / rate`` after the previous chunk finished) plus the one-way delay; order is kept.
By default both directions are shaped; ``directions="down"`` shapes only what the server sends
back (the device's uplink, which is what split computing and hard-example offloading use).

    python -m evc_sim.linkproxy --target 127.0.0.1:8500 --rate-mbit 5 --delay-ms 2 [--listen 0]

``LinkProxy(...).start()`` runs one in a thread and returns its port (``stop()`` ends it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

CHUNK = 16 * 1024


@dataclass
class Shaper:
    """One direction of the link: when it is next free."""

    rate_bps: float | None
    delay_s: float
    free_at: float = 0.0

    def departure(self, nbytes: int, now: float) -> float:
        """When *nbytes* handed to the link at *now* arrive at the other end."""
        if not self.rate_bps:
            return now + self.delay_s
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8.0 / self.rate_bps
        return self.free_at + self.delay_s


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: Shaper) -> None:
    loop = asyncio.get_running_loop()
    queue: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not queue:
                if done:
                    return
                arrived.clear()
                await arrived.wait()
            at, data = queue.popleft()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the link's own time, never the model's
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.append((shaper.departure(len(data), loop.time()), data))
            arrived.set()
    except (ConnectionError, OSError):
        pass
    finally:
        done = True
        arrived.set()
        with contextlib.suppress(ConnectionError, OSError):
            await sender
            if writer.can_write_eof():
                writer.write_eof()


class LinkProxy:
    """A shaped link from ``listen`` to ``target``: *rate_mbit* (None: unlimited), *delay_ms*
    one way, on ``"both"`` directions or only ``"down"`` (server → client) or ``"up"``."""

    def __init__(
        self, target: tuple[str, int], rate_mbit: float | None = None, delay_ms: float = 0.0,
        directions: str = "both", listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:  # fmt: skip
        if directions not in ("both", "down", "up"):
            raise ValueError("directions must be both, down or up")
        rate = rate_mbit * 1e6 if rate_mbit else None
        self.target, self.listen = target, listen
        self.up = Shaper(rate if directions in ("both", "up") else None, delay_ms / 1e3 if directions != "down" else 0)
        self.down = Shaper(
            rate if directions in ("both", "down") else None, delay_ms / 1e3 if directions != "up" else 0
        )
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, s_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(c_reader, s_writer, self.up), _pump(s_reader, c_writer, self.down))
        for w in (c_writer, s_writer):
            w.close()

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        """Serve until cancelled."""
        await self._open()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> int:
        """Serve in a thread; the port it listens on."""
        loop = self._loop = asyncio.new_event_loop()
        loop.run_until_complete(self._open())

        def run() -> None:
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="linkproxy", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection; end the thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evc_sim.linkproxy", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (port 0: any)")
    p.add_argument("--rate-mbit", type=float, default=None, help="bandwidth in Mbit/s (default: unlimited)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way latency in ms")
    p.add_argument("--directions", default="both", choices=["both", "down", "up"])
    a = p.parse_args(argv)
    th, tp = a.target.rsplit(":", 1)
    lh, lp = a.listen.rsplit(":", 1)
    proxy = LinkProxy((th, int(tp)), a.rate_mbit, a.delay_ms, a.directions, (lh, int(lp)))

    async def run() -> None:
        task = asyncio.create_task(proxy.serve())
        while not proxy.port:
            await asyncio.sleep(0.01)
        print(f"linkproxy 127.0.0.1:{proxy.port} -> {a.target}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
