"""Pooled, persistent SSH connections to devices, kept by one asyncio loop per worker process.

Why a background loop: Celery prefork tasks are synchronous, and the usual ``asyncio.run`` per
task closes its loop (and every connection opened on it) when the task returns. Health sweeps
run every minute over the whole fleet, so their connections must outlive one task: each worker
process lazily starts ONE event loop in a daemon thread (after the fork, never at import), the
pool lives on that loop, and sync callers hand it coroutines with
``asyncio.run_coroutine_threadsafe`` (:func:`call`). The loop and the pools belong to the
process's :class:`~evc.runtime.WorkerRuntime` (which is also where fork safety lives): closed
with it when the worker process exits (:mod:`evc.workers.signals`) or at ``atexit``, or by
:func:`shutdown`.

The pool is keyed by device id; an entry remembers the :class:`~evc.ssh.Target` it was opened
for (address, user, pinned host key, jump host), so a device whose record changed reconnects.
Connections go through :func:`evc.ssh.connect` (pinned host keys); a failed connect sets a
per-device next-allowed-attempt time with exponential backoff, so a down device is not
hammered; a connection that drops or times out is closed and forgotten.

Keepalives: a pooled connection is used by every sweep, so it sends a keepalive only after
two health intervals without traffic (:func:`keepalive_s`), not every 30 s like a one-off
connection. At 5,000 devices, 30 s keepalives are 5,000 / 30 = ~170 extra round trips a second
on the controller and the devices, and, once a sweep takes longer than 30 s, part of its cost.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh

from evc import ssh
from evc.errors import CommandFailed, ConnectionDropped, DeviceError, SSHTimeout
from evc.runtime import WorkerRuntime, metric_hook
from evc.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: an operation on one pooled connection: ``await op(conn, target)``
Operation = Callable[[asyncssh.SSHClientConnection, ssh.Target], Awaitable[T]]


@dataclass
class _Entry:
    target: ssh.Target
    conn: asyncssh.SSHClientConnection


@dataclass
class _Backoff:
    failures: int
    next_attempt: float  # time.monotonic()
    error: DeviceError


@dataclass(frozen=True)
class PoolStats:
    """What the pool holds and has done since it started."""

    size: int
    opened: int
    closed: int
    backing_off: int


def keepalive_s(settings: Settings) -> float:
    """Seconds without traffic before a pooled connection sends a keepalive: two health
    intervals (a swept connection never needs one), at least :data:`evc.ssh.KEEPALIVE_S`."""
    return max(ssh.KEEPALIVE_S, 2.0 * settings.health_interval_s)


class SSHPool:
    """Persistent connections to devices, at most ``concurrency`` operations at a time.

    Every method must run on the pool's own event loop (use :func:`call` from sync code)."""

    def __init__(self, settings: Settings, *, concurrency: int | None = None) -> None:
        self.settings = settings
        self.concurrency = max(1, concurrency or settings.health_concurrency)
        self._sem = asyncio.Semaphore(self.concurrency)
        self._entries: dict[str, _Entry] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._backoff: dict[str, _Backoff] = {}
        self.opened = 0
        self.closed = 0

    # ------------------------------------------------------------------ public
    async def use(self, device: Mapping[str, Any], op: Operation[T]) -> T:
        """Run *op* on the device's pooled connection (opened when missing or stale).

        A reused connection that turns out to be dead is replaced once, at once; a connection
        that drops or times out is closed. Raises :class:`~evc.errors.DeviceError`."""
        target = ssh.target_of(device)
        device_id = str(device["id"])
        async with self._sem:
            conn, reused = await self._connection(device_id, target)
            try:
                return await op(conn, target)
            except (ConnectionDropped, asyncssh.ChannelOpenError) as exc:
                self._discard(device_id, conn)
                if not reused:
                    raise
                log.debug("pooled connection to %s was dead (%s); reconnecting", device_id, exc)
            except (SSHTimeout, asyncio.CancelledError):
                # the command may still run on the device: start clean next time
                self._discard(device_id, conn)
                raise
            conn, _ = await self._connection(device_id, target)
            try:
                return await op(conn, target)
            except (ConnectionDropped, SSHTimeout, asyncio.CancelledError):
                self._discard(device_id, conn)
                raise

    def size(self) -> int:
        return len(self._entries)

    def stats(self) -> PoolStats:
        return PoolStats(self.size(), self.opened, self.closed, len(self._backoff))

    def backing_off(self, device_id: str) -> float:
        """Seconds until the next connection attempt to *device_id* is allowed (0: now)."""
        b = self._backoff.get(device_id)
        return max(0.0, b.next_attempt - time.monotonic()) if b else 0.0

    async def forget(self, device_id: str) -> None:
        """Close the device's connection and clear its backoff."""
        self._backoff.pop(device_id, None)
        self._connecting.pop(device_id, None)
        entry = self._entries.get(device_id)
        if entry is not None:
            self._discard(device_id, entry.conn)

    async def prune(self, keep: Collection[str]) -> int:
        """Close connections of devices not in *keep* (removed devices); returns how many."""
        gone = [d for d in self._entries if d not in keep]
        for d in gone:
            await self.forget(d)
        for d in [d for d in self._backoff if d not in keep]:
            del self._backoff[d]
        return len(gone)

    async def close_all(self) -> None:
        entries = list(self._entries.items())
        for device_id, entry in entries:
            self._discard(device_id, entry.conn)
        await asyncio.gather(*(e.conn.wait_closed() for _, e in entries), return_exceptions=True)

    # ------------------------------------------------------------------ internals
    async def _connection(self, device_id: str, target: ssh.Target) -> tuple[asyncssh.SSHClientConnection, bool]:
        entry = self._entries.get(device_id)
        if entry is not None and entry.target == target and not entry.conn.is_closed():
            return entry.conn, True
        lock = self._connecting.setdefault(device_id, asyncio.Lock())
        async with lock:
            entry = self._entries.get(device_id)
            if entry is not None:
                if entry.target == target and not entry.conn.is_closed():
                    return entry.conn, True  # another task connected while we waited
                self._discard(device_id, entry.conn)  # record changed, or the connection died
            self._check_backoff(device_id, target)
            try:
                conn = await ssh.connect(target, self.settings, keepalive_interval=keepalive_s(self.settings))
            except DeviceError as exc:
                self._fail(device_id, exc)
                raise
            self._backoff.pop(device_id, None)
            self._entries[device_id] = _Entry(target, conn)
            self.opened += 1
            self._report_size()
            return conn, False

    def _check_backoff(self, device_id: str, target: ssh.Target) -> None:
        b = self._backoff.get(device_id)
        if b is None:
            return
        wait = b.next_attempt - time.monotonic()
        if wait <= 0:
            return
        last = b.error
        cls = type(last) if not isinstance(last, CommandFailed) else DeviceError
        raise cls(
            f"{last.message} (not retrying for another {wait:.1f}s after {b.failures} failed connection attempts)",
            device_id=device_id,
            backoff_s=round(wait, 1),
        )

    def _fail(self, device_id: str, exc: DeviceError) -> None:
        prev = self._backoff.get(device_id)
        failures = (prev.failures if prev else 0) + 1
        delay = min(self.settings.ssh_backoff_max_s, self.settings.ssh_backoff_s * 2 ** (failures - 1))
        self._backoff[device_id] = _Backoff(failures, time.monotonic() + delay, exc)

    def _discard(self, device_id: str, conn: asyncssh.SSHClientConnection) -> None:
        entry = self._entries.get(device_id)
        if entry is not None and entry.conn is conn:
            del self._entries[device_id]
            self._report_size()
        conn.close()
        self.closed += 1

    def _report_size(self) -> None:
        gauge = optional_metric("set_ssh_pool_size")
        if gauge is not None:
            try:
                gauge(len(self._entries))
            except Exception:  # noqa: BLE001 - metrics never break the pool
                log.debug("set_ssh_pool_size failed", exc_info=True)


def settle(pool: SSHPool, mark: tuple[int, int]) -> None:
    """After a sweep: when the pool opened or closed connections since *mark* (``(opened,
    closed)`` before it), move what the process holds now out of the garbage collector's sight
    (``gc.freeze``) after one full collection (``gc.unfreeze`` first, so closed connections are
    reclaimed). A warm sweep's collections then scan only what the sweep itself allocates, not
    every pooled connection: in a pool of 4,000, collector pauses were 10-14 % of a sweep's CPU
    (cProfile), a cost per device that grows with the pool. What dies between two changes
    of the pool and was frozen is reclaimed at the next one (reference counting frees the rest)."""
    if (pool.opened, pool.closed) == mark:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def optional_metric(name: str) -> Callable[..., Any] | None:
    """``evc.metrics.<name>`` when that module provides it (looked up once per process)."""
    rt = WorkerRuntime.peek()  # (a pool closing with its runtime must not start another)
    return rt.metric(name) if rt is not None else metric_hook(name)


# ---------------------------------------------------------------------- one loop per process
class LoopThread:
    """An asyncio event loop running forever in a daemon thread of this process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="evc-ssh-loop", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run *coro* on the loop and wait for its result (cancelled if the caller gives up)."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("LoopThread.submit called from its own loop: await instead")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:  # a timeout, or Celery's soft time limit in this thread
            fut.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


def process_loop() -> LoopThread:
    """This process's loop thread, started on first use (a forked child starts its own): the
    one of :class:`~evc.runtime.WorkerRuntime`."""
    return WorkerRuntime.current().loop()


def call(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run *coro* on this process's loop from sync code and return its result."""
    return process_loop().submit(coro, timeout)


def pool_for(settings: Settings) -> SSHPool:
    """This process's pool for *settings* (created on first use, on the process loop)."""
    return WorkerRuntime.current().pool(settings)


def shutdown(timeout: float = 5.0) -> None:
    """Close every pooled connection (and FL channel) and stop this process's loop; a later
    call starts another (idempotent)."""
    rt = WorkerRuntime.peek()
    if rt is not None:
        rt.close_loop(timeout)


__all__ = [
    "LoopThread",
    "PoolStats",
    "SSHPool",
    "call",
    "optional_metric",
    "pool_for",
    "process_loop",
    "shutdown",
]
