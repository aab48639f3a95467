"""One mutating job per device: Redis locks with an owner and an expiry, kept alive while held."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from evc.store import Store

log = logging.getLogger(__name__)

#: how long a lock outlives its last refresh: a crashed worker's locks expire after this
LOCK_TTL_S = 60.0
POLL_S = 0.5


def device_lock(device_id: str) -> str:
    """The lock name every mutating job takes for a device."""
    return f"device:{device_id}"


class DeviceLocks:
    """The device locks one job holds. Acquire in a fixed (sorted) order so that two jobs
    waiting for overlapping devices cannot deadlock."""

    def __init__(self, store: Store, owner: str, ttl_s: float = LOCK_TTL_S) -> None:
        self.store = store
        self.owner = owner
        self.ttl_s = ttl_s
        self.held: list[str] = []

    def holder(self, device_id: str) -> str | None:
        """The job that holds the device's lock (owners are ``<job>:<attempt>``)."""
        owner = self.store.lock_owner(device_lock(device_id))
        return owner.split(":", 1)[0] if owner else None

    def try_acquire(self, device_id: str) -> bool:
        name = device_lock(device_id)
        ok = self.store.acquire_lock(name, self.owner, self.ttl_s) or self.store.refresh_lock(
            name, self.owner, self.ttl_s
        )  # refresh: a redelivered job already holds its own locks
        if not ok:
            # a new attempt of the same job takes the locks of its lost (stale) attempt over
            held = self.store.lock_owner(name)
            job = self.owner.split(":", 1)[0]
            if held and held != self.owner and held.split(":", 1)[0] == job and ":" in self.owner:
                ok = self.store.take_over_lock(name, held, self.owner, self.ttl_s)
        if ok and device_id not in self.held:
            self.held.append(device_id)
        return ok

    def acquire(
        self,
        device_ids: Iterable[str],
        wait: bool,
        timeout_s: float = 300.0,
        cancelled: Callable[[], bool] | None = None,
        on_wait: Callable[[str, str | None], object] | None = None,
    ) -> dict[str, str]:
        """Take every lock it can; returns ``{device: why not}`` for those it could not take.

        ``wait=False`` refuses a device locked by another job at once; ``wait=True`` waits
        behind the holder until *timeout_s* (or a cancel) runs out."""
        refused: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        for dev in sorted(set(device_ids)):
            if self.try_acquire(dev):
                continue
            holder = self.holder(dev)
            if not wait:
                refused[dev] = f"the device is locked by job {holder}"
                continue
            if on_wait is not None:
                on_wait(dev, holder)
            while True:
                if cancelled is not None and cancelled():
                    refused[dev] = "cancelled while waiting for the device lock"
                    break
                if time.monotonic() >= deadline:
                    refused[dev] = (
                        f"timed out after {timeout_s:.0f}s waiting for job "
                        f"{self.holder(dev) or holder} to release the device"
                    )
                    break
                time.sleep(POLL_S)
                if self.try_acquire(dev):
                    break
        return refused

    def refresh(self) -> None:
        for dev in list(self.held):
            if not self.store.refresh_lock(device_lock(dev), self.owner, self.ttl_s):
                log.warning("job %s lost its lock on device %s", self.owner, dev)

    def release(self) -> None:
        for dev in self.held:
            try:
                self.store.release_lock(device_lock(dev), self.owner)
            except Exception:  # expiry frees it anyway
                log.exception("could not release the lock on %s", dev)
        self.held = []

    @contextmanager
    def kept_alive(self) -> Iterator[DeviceLocks]:
        """Refresh the held locks every third of their TTL until the block ends."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    self.refresh()
                except Exception:
                    log.exception("lock refresh failed for job %s", self.owner)

        t = threading.Thread(target=loop, name=f"locks-{self.owner}", daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join(5)
