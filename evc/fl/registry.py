"""The FL client channels of one process: :class:`ChannelRegistry`, keyed by (job, device).

A registry lives on the process's event-loop thread, owned by the process's
:class:`~evc.runtime.WorkerRuntime` (:func:`evc.fl.channels.registry_for` returns it), so its
channels (:class:`~evc.fl.channels.ClientChannel`) outlive the Celery task that opened them.
Channels unused for ``fl_channel_idle_s`` close, and so do, within a few seconds, the channels
of a job that is no longer running (the registry asks ``job_alive``). A request that gave up
leaves a reader that waits for its reply, so late replies are seen -- and discarded -- as they
come (see :mod:`evc.fl.channels` for the trade-offs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.errors import CommandFailed, ConnectionDropped, DeviceError, SSHTimeout
from evc.fl.channels import ClientChannel, ClientSpec
from evc.fl.protocol import PROTOCOL_VERSION
from evc.settings import Settings
from evc.store import JSON

log = logging.getLogger(__name__)

#: how often the registry looks for idle channels and channels of finished jobs
REAP_INTERVAL_S = 2.0
#: how long a reply that missed its round is waited for before the channel is restarted
LATE_WAIT_S = 600.0


@dataclass
class FitCall:
    """What one request through the registry produced."""

    reply: dict[str, Any]
    started: bool  # a client process was started for it
    late: list[JSON] = field(default_factory=list)
    pid: int | None = None


@dataclass(frozen=True)
class RegistryStats:
    channels: int
    started: int
    closed: int


# ---------------------------------------------------------------------- the per-process registry
class ChannelRegistry:
    """Client channels of this worker process, keyed by (job, device); runs on one loop.

    ``job_alive(job_id)`` (optional, sync, may block briefly) tells the reaper whether a job
    still runs; its channels close when it does not. ``on_late(job_id, device_id, item)``
    (optional, sync) hears of each reply that came after its request had given up: a request
    that times out leaves a reader on the channel that waits for its reply (up to
    :data:`LATE_WAIT_S`), so late replies are seen -- and discarded -- as they come.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        idle_s: float | None = None,
        job_alive: Callable[[str], bool] | None = None,
        on_late: Callable[[str, str, JSON], None] | None = None,
    ) -> None:
        self.settings = settings
        self.idle_s = settings.fl_channel_idle_s if idle_s is None else idle_s
        self.job_alive = job_alive
        self.on_late = on_late
        self._drains: set[asyncio.Task[None]] = set()
        self._drain_keys: dict[asyncio.Task[None], tuple[str, str]] = {}
        self._channels: dict[tuple[str, str], ClientChannel] = {}
        self._opening: dict[tuple[str, str], asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.started = 0
        self.closed = 0

    def stats(self) -> RegistryStats:
        return RegistryStats(len(self._channels), self.started, self.closed)

    def channels(self, job_id: str | None = None) -> list[ClientChannel]:
        return [c for k, c in self._channels.items() if job_id is None or k[0] == job_id]

    async def request(
        self,
        job_id: str,
        device: Mapping[str, Any],
        spec: ClientSpec,
        message: Mapping[str, Any],
        timeout: float,
    ) -> FitCall:
        """Send *message* to the job's client on *device* (starting it if needed), return the
        reply. A reused channel found dead is replaced once; a fresh one that fails raises."""
        self._ensure_reaper()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = (job_id, str(device["id"]))
        late: list[JSON] = []
        for attempt in (0, 1):
            channel, started = await self._channel(key, device, spec, deadline, late)
            try:
                async with channel.lock:
                    try:
                        reply = await channel.request(message, deadline, late)
                    except SSHTimeout:
                        self._drain_later(channel, message.get("id"))
                        raise
                return FitCall(reply, started, late, channel.pid)
            except ConnectionDropped:
                self._discard(key, channel)
                if started or attempt:
                    raise
            except CommandFailed:
                self._discard(key, channel)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _channel(
        self,
        key: tuple[str, str],
        device: Mapping[str, Any],
        spec: ClientSpec,
        deadline: float,
        late: list[JSON],
    ) -> tuple[ClientChannel, bool]:
        channel = self._channels.get(key)
        if channel is not None and not channel.dead and channel.spec == spec:
            return channel, False
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:
            channel = self._channels.get(key)
            if channel is not None:
                if not channel.dead and channel.spec == spec:
                    return channel, False
                self._discard(key, channel)
            channel = await self._open(key, device, spec, deadline, late)
            self._channels[key] = channel
            self.started += 1
            return channel, True

    async def _open(
        self,
        key: tuple[str, str],
        device: Mapping[str, Any],
        spec: ClientSpec,
        deadline: float,
        late: list[JSON],
    ) -> ClientChannel:
        loop = asyncio.get_running_loop()

        async def start(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> asyncssh.SSHClientProcess[bytes]:
            try:
                return await conn.create_process(spec.command, encoding=None)
            except asyncssh.ChannelOpenError as exc:
                raise ConnectionDropped(
                    f"{target.address} refused a channel for the FL client: {exc}",
                    device_id=target.device_id,
                ) from exc

        pool = pooling.pool_for(self.settings)
        remaining = max(0.001, deadline - loop.time())
        try:
            process = await asyncio.wait_for(pool.use(device, start), remaining)
        except TimeoutError:
            raise SSHTimeout("could not start the FL client before the round deadline", device_id=key[1]) from None
        channel = ClientChannel(key, process, spec)
        channel.device_name = str(device.get("name") or key[1])
        try:
            pong = await channel.request({"op": "ping", "id": f"start:{key[0]}"}, deadline, late)
        except BaseException:
            channel.close()
            raise
        if pong.get("version") != PROTOCOL_VERSION:
            channel.close()
            raise CommandFailed(
                f"the FL client on the device speaks protocol {pong.get('version')!r}, the "
                f"server {PROTOCOL_VERSION}: reinstall it (the fl-client playbook)",
                device_id=key[1],
            )
        channel.pid = pong.get("pid")
        channel.num_examples = pong.get("num_examples")
        log.debug("started FL client %s on %s (pid %s)", key[0], key[1], channel.pid)
        return channel

    def _drain_later(self, channel: ClientChannel, rid: Any) -> None:
        """Wait, in the background and holding the channel, for the reply to a request that
        gave up; report it (and anything before it) as late."""
        if rid is None or channel.dead:
            return

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            late: list[JSON] = []
            async with channel.lock:
                try:
                    reply = await channel.reply(rid, loop.time() + LATE_WAIT_S, late)
                    late.append({"id": rid, "op": reply.get("op"), "round": reply.get("round")})
                except SSHTimeout:
                    self._discard(channel.key, channel)  # out of step for good: start afresh
                except DeviceError:
                    pass
            if self.on_late is not None:
                for item in late:
                    try:
                        await loop.run_in_executor(None, self.on_late, channel.key[0], channel.key[1], item)
                    except Exception:  # noqa: BLE001 - recording is best effort
                        log.debug("recording a late FL reply failed", exc_info=True)

        task = asyncio.ensure_future(drain())
        self._drains.add(task)
        self._drain_keys[task] = channel.key
        task.add_done_callback(self._drains.discard)
        task.add_done_callback(lambda t: self._drain_keys.pop(t, None))

    def _discard(self, key: tuple[str, str], channel: ClientChannel) -> None:
        if self._channels.get(key) is channel:
            del self._channels[key]
        channel.close()
        self.closed += 1

    async def close_job(self, job_id: str, grace_s: float = 4.0) -> int:
        """Close every channel of *job_id* in this process; returns how many. Replies still
        awaited from requests that gave up get *grace_s* to arrive, so they are recorded as late
        rather than lost with the channel."""
        pending = [t for t, k in self._drain_keys.items() if k[0] == job_id and not t.done()]
        if pending and grace_s > 0:
            await asyncio.wait(pending, timeout=grace_s)
        keys = [k for k in self._channels if k[0] == job_id]
        for k in keys:
            self._discard(k, self._channels[k])
        return len(keys)

    async def close_all(self) -> None:
        for k in list(self._channels):
            self._discard(k, self._channels[k])
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    async def reap(self) -> int:
        """Close idle and dead channels and those of jobs no longer running; returns how many."""
        now = time.monotonic()
        gone = [
            k for k, c in self._channels.items() if c.dead or (now - c.last_used > self.idle_s and not c.lock.locked())
        ]
        for k in gone:
            self._discard(k, self._channels[k])
        if self.job_alive is not None:
            jobs = {k[0] for k in self._channels}
            loop = asyncio.get_running_loop()
            for job_id in jobs:
                try:
                    alive = await loop.run_in_executor(None, self.job_alive, job_id)
                except Exception:  # noqa: BLE001 - a store hiccup keeps the channels
                    log.debug("job_alive(%s) failed", job_id, exc_info=True)
                    continue
                if not alive:
                    gone += [k for k in self._channels if k[0] == job_id]
                    await self.close_job(job_id)
        return len(gone)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await self.reap()
            except Exception:  # noqa: BLE001 - the reaper never dies
                log.debug("reaping FL channels failed", exc_info=True)


__all__ = ["LATE_WAIT_S", "REAP_INTERVAL_S", "ChannelRegistry", "FitCall", "RegistryStats"]
