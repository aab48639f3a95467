"""One worker runtime: the state an EVC process keeps for as long as it lives.

A :class:`WorkerRuntime` holds what must not be shared between processes and must outlive one
task: the settings, a :class:`~evc.store.Store` per settings, the asyncio loop thread with the
SSH connection pools (:mod:`evc.pool`) and the FL client channels (:mod:`evc.fl.registry`) on
it, the thread that renews the leases of the job attempts this process runs, the task
publishers (:class:`evc.workers.publish.TaskPublisher`, one per Celery app) and the metric
hooks looked up once. Nothing starts when it is created: each part starts on first use.

Lifecycle. :meth:`WorkerRuntime.current` returns this process's runtime, creating it on first
use (the API under gunicorn, the CLI, tests). A Celery worker creates it in
``worker_process_init`` (prefork children) or ``worker_init`` (solo/threads pools) and closes it
in ``worker_process_shutdown`` / ``worker_shutdown``: :mod:`evc.workers.signals` holds those
handlers. After :meth:`WorkerRuntime.stop`, the next :meth:`current` starts a fresh one.

Fork safety lives here and only here: ``os.register_at_fork(after_in_child=...)`` forgets the
parent's runtime in every forked child (its threads do not exist there and its sockets belong to
the parent), so the child's first :meth:`current` builds its own. Nothing else checks the pid.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from evc.settings import Settings, load_settings
from evc.store import JSON, Store

if TYPE_CHECKING:
    from evc.fl.registry import ChannelRegistry
    from evc.jobs import JobRun
    from evc.pool import LoopThread, SSHPool

log = logging.getLogger(__name__)

P = TypeVar("P")

_MISSING = object()


class LeaseRenewer:
    """The attempts this process is executing, with a thread that renews their leases. A lease
    that cannot be renewed (another attempt took the job, or it expired while this process
    was stalled) marks its run stale: the run stops at its next check point. The thread starts
    with the first lease held and ends with :meth:`stop`."""

    def __init__(self) -> None:
        self.active: dict[str, JobRun] = {}
        self.lock = threading.Lock()
        self.ttl = 30.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, run: JobRun, ttl_s: float) -> None:
        with self.lock:
            self.active[run.id] = run
            self.ttl = ttl_s
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._renew, name="evc-job-leases", daemon=True)
                self._thread.start()

    def drop(self, run: JobRun) -> None:
        with self.lock:
            if self.active.get(run.id) is run:
                del self.active[run.id]

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _renew(self) -> None:
        while not self._stop.wait(max(0.1, self.ttl / 3)):
            self.renew_once()

    def renew_once(self) -> None:
        with self.lock:
            held = list(self.active.values())
        for run in held:
            try:
                if run.attempt is not None and not run.store.renew_lease(run.id, run.attempt, self.ttl):
                    log.warning("job %s: attempt %s lost its lease; it stops", run.id, run.attempt)
                    run.stale = True
            except Exception:  # noqa: BLE001 - Redis away for a moment: the next round retries
                log.debug("could not renew the lease of %s", run.id)


class WorkerRuntime:
    """The per-process state of EVC (see the module's docstring). Thread-safe."""

    _current: ClassVar[WorkerRuntime | None] = None
    _current_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, settings: Settings | None = None) -> None:
        self.pid = os.getpid()
        self._settings = settings
        self._lock = threading.RLock()
        self._stores: dict[Settings, Store] = {}
        self._loop: LoopThread | None = None
        self._pools: dict[Settings, SSHPool] = {}
        self._registries: dict[Settings, ChannelRegistry] = {}
        self._publishers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._metric_hooks: dict[str, Any] = {}
        self.leases = LeaseRenewer()
        self.closed = False

    # ------------------------------------------------------------------ this process's runtime
    @classmethod
    def current(cls) -> WorkerRuntime:
        """This process's runtime, created on first use (and after :meth:`stop`)."""
        rt = cls._current
        if rt is not None and not rt.closed:
            return rt
        with cls._current_lock:
            if cls._current is None or cls._current.closed:
                cls._current = cls()
            return cls._current

    @classmethod
    def peek(cls) -> WorkerRuntime | None:
        """This process's runtime if one exists; creates none."""
        rt = cls._current
        return rt if rt is not None and not rt.closed else None

    @classmethod
    def start(cls, settings: Settings | None = None) -> WorkerRuntime:
        """Install a new runtime for this process (a worker process starting), closing the one
        it replaces."""
        with cls._current_lock:
            old, cls._current = cls._current, cls(settings)
            new = cls._current
        if old is not None:
            old.close()
        return new

    @classmethod
    def stop(cls, timeout: float = 5.0) -> None:
        """Close this process's runtime (a worker process exiting); idempotent."""
        with cls._current_lock:
            old, cls._current = cls._current, None
        if old is not None:
            old.close(timeout)

    @classmethod
    def _forget_after_fork(cls) -> None:
        """In a forked child: the parent's runtime is not ours (its threads are gone, its
        sockets are the parent's). Drop it unclosed; the child builds its own on first use."""
        cls._current_lock = threading.Lock()
        cls._current = None

    # ------------------------------------------------------------------ the parts
    @property
    def settings(self) -> Settings:
        """The settings this runtime was started with (loaded from the environment if none)."""
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = load_settings()
        return self._settings

    def store(self, settings: Settings | None = None) -> Store:
        """One Store per settings: its connection pool serves every task of this process."""
        settings = settings or self.settings
        st = self._stores.get(settings)
        if st is None:
            with self._lock:
                self._check_open()
                st = self._stores.get(settings)
                if st is None:
                    st = self._stores[settings] = Store.from_settings(settings)
        return st

    def loop(self) -> LoopThread:
        """The asyncio loop thread of this process (SSH pools, FL channels), started on first use."""
        from evc.pool import LoopThread

        global _atexit_registered
        with self._lock:
            self._check_open()
            if self._loop is None or not self._loop.thread.is_alive():
                self._loop = LoopThread()
                if not _atexit_registered:
                    atexit.register(WorkerRuntime.stop)
                    _atexit_registered = True
            return self._loop

    def pool(self, settings: Settings) -> SSHPool:
        """The SSH pool for *settings*, created on first use (it lives on :meth:`loop`)."""
        from evc.pool import SSHPool

        self.loop()
        with self._lock:
            pool = self._pools.get(settings)
            if pool is None:
                pool = self._pools[settings] = SSHPool(settings)
            return pool

    def channels(
        self,
        settings: Settings,
        job_alive: Callable[[str], bool] | None = None,
        on_late: Callable[[str, str, JSON], None] | None = None,
    ) -> ChannelRegistry:
        """The FL client channels for *settings*, created on first use (on :meth:`loop`); the
        first *job_alive* / *on_late* given stay."""
        from evc.fl.registry import ChannelRegistry

        self.loop()
        with self._lock:
            reg = self._registries.get(settings)
            if reg is None:
                reg = self._registries[settings] = ChannelRegistry(settings, job_alive=job_alive, on_late=on_late)
            reg.job_alive = reg.job_alive or job_alive
            reg.on_late = reg.on_late or on_late
            return reg

    def registries(self) -> list[ChannelRegistry]:
        """The FL channel registries this runtime has created (none are created here)."""
        with self._lock:
            return list(self._registries.values())

    def publisher(self, owner: Any, make: Callable[[Any], P]) -> P:
        """The publisher of *owner* (a Celery app) in this process, built by *make* once."""
        try:
            return self._publishers[owner]
        except KeyError:
            with self._lock:
                pub = self._publishers.get(owner, _MISSING)
                if pub is _MISSING:
                    pub = self._publishers[owner] = make(owner)
                return pub

    def metric(self, name: str) -> Callable[..., Any] | None:
        """``evc.metrics.<name>`` when that module provides it (looked up once)."""
        fn: Any = self._metric_hooks.get(name, _MISSING)
        if fn is _MISSING:
            fn = self._metric_hooks[name] = metric_hook(name)
        return fn

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this worker runtime is closed; use WorkerRuntime.current()")

    # ------------------------------------------------------------------ closing
    def close_channels(self, timeout: float = 5.0) -> None:
        """Close every FL client channel of this process (the SSH pools stay); best effort."""
        with self._lock:
            regs, loop = list(self._registries.values()), self._loop
            self._registries.clear()
        if regs and loop is not None and loop.thread.is_alive():
            try:
                loop.submit(_close_all(regs, []), timeout)
            except Exception:  # noqa: BLE001
                log.debug("closing the FL channels failed", exc_info=True)

    def close_loop(self, timeout: float = 5.0) -> None:
        """Close the FL channels and SSH connections and stop the loop thread; a later use
        starts them afresh. Best effort, idempotent."""
        with self._lock:
            loop, self._loop = self._loop, None
            regs, pools = list(self._registries.values()), list(self._pools.values())
            self._registries.clear()
            self._pools.clear()
        if loop is None:
            return
        if loop.thread.is_alive():
            try:
                loop.submit(_close_all(regs, pools), timeout)
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("closing the FL channels and SSH pools failed", exc_info=True)
        loop.stop(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Close everything this runtime started: channels, pools, loop, lease renewer, stores."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            stores = list(self._stores.values())
            self._stores.clear()
        self.leases.stop()
        self.close_loop(timeout)
        for st in stores:
            closer = getattr(st, "close", None)
            if callable(closer):
                with contextlib.suppress(Exception):
                    closer()


def metric_hook(name: str) -> Callable[..., Any] | None:
    """``evc.metrics.<name>`` when that module provides it, else None (uncached)."""
    try:
        import importlib

        return getattr(importlib.import_module("evc.metrics"), name, None)
    except ImportError:
        return None


async def _close_all(regs: list[ChannelRegistry], pools: list[SSHPool]) -> None:
    for reg in regs:
        with contextlib.suppress(Exception):
            await reg.close_all()
    for p in pools:
        await p.close_all()


_atexit_registered = False

os.register_at_fork(after_in_child=WorkerRuntime._forget_after_fork)

__all__ = ["LeaseRenewer", "WorkerRuntime", "metric_hook"]
