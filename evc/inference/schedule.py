"""The parallel-inference scheduler: devices pull chunks of items; pure (no I/O, no clock).

Dynamic mode (EVC's): each device asks for its next chunk when it is idle; a chunk's size is
the device's measured rate (items/s, a moving average of its past chunks) times
``target_s``, capped near the end at half of the device's fair share of what is left (so the
last chunks end together). When nothing is left to hand out, an idle device may take a copy
of a chunk still in flight elsewhere when it would finish it sooner (a straggler's): the first
result wins, the later copy's items are dropped as duplicates. A device whose request fails
gives its chunk back (its items go to the others); after ``max_failures`` failures in a row it
is dropped. Every item is recorded once: :meth:`Scheduler.complete` says which items of a
result are new.

Static mode (the baseline, the original's method): the items are split evenly and in order
over the devices up front; each device works through its own share in chunks of
``max_items``; no re-issue (a failed device's share still goes back to the others).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MODES = ("dynamic", "static")


@dataclass(frozen=True)
class ChunkPolicy:
    """How chunks are cut and handed out (the job's ``chunk`` settings)."""

    mode: str = "dynamic"
    target_s: float = 1.0  # a chunk should take about this long on its device
    first_items: int = 32  # a device's first chunk, before its rate is known
    min_items: int = 8
    max_items: int = 4096
    reissue: bool = True  # copy stragglers' chunks to idle devices
    max_copies: int = 2  # at most this many devices work on one chunk at once
    max_failures: int = 2  # failures in a row before a device is dropped
    alpha: float = 0.5  # weight of the newest chunk in a device's rate

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}")
        if not 1 <= self.min_items <= self.max_items or self.first_items < 1 or self.target_s <= 0:
            raise ValueError("need 1 <= min_items <= max_items, first_items >= 1 and target_s > 0")
        if self.max_copies < 1 or self.max_failures < 1 or not 0 < self.alpha <= 1:
            raise ValueError("need max_copies >= 1, max_failures >= 1 and 0 < alpha <= 1")


@dataclass(frozen=True)
class Chunk:
    """Items ``start .. stop-1``; ``copy`` > 0 for a re-issued copy."""

    id: int
    start: int
    stop: int
    copy: int = 0

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class DeviceStats:
    """What one device did: chunks, items it recorded first, its rate, failures, duplicates."""

    rate: float | None = None  # items/s, moving average
    chunks: int = 0
    items: int = 0  # items whose recorded result came from this device
    duplicates: int = 0  # items it answered after another device had
    reissued: int = 0  # copies of stragglers' chunks it was given
    failures: int = 0
    failures_in_row: int = 0
    busy_s: float = 0.0
    processed: int = 0  # items of the chunks it answered (duplicates included)
    dropped: bool = False
    own: list[tuple[int, int]] = field(default_factory=list)  # static mode: its share


@dataclass
class _InFlight:
    chunk: Chunk
    holders: dict[str, float]  # device -> when it was handed the chunk
    copies: int = 1


def _take(ranges: list[tuple[int, int]], size: int) -> tuple[int, int] | None:
    """Carve up to *size* items off the first of *ranges* (in place)."""
    if not ranges:
        return None
    start, stop = ranges[0]
    end = min(stop, start + size)
    if end == stop:
        ranges.pop(0)
    else:
        ranges[0] = (end, stop)
    return start, end


class Scheduler:
    """Hands out chunks of ``n_items`` items to *devices* and records which items are done."""

    def __init__(self, n_items: int, devices: Sequence[str], policy: ChunkPolicy | None = None) -> None:
        if n_items < 0 or not devices or len(set(devices)) != len(devices):
            raise ValueError("need n_items >= 0 and at least one device, each named once")
        self.policy = policy or ChunkPolicy()
        self.n_items = n_items
        self.devices = {d: DeviceStats() for d in devices}
        self.pending: list[tuple[int, int]] = [(0, n_items)] if n_items else []
        self.flight: dict[int, _InFlight] = {}
        self._done = bytearray(n_items)
        self.done_items = 0
        self.duplicates = 0
        self.requeued = 0
        self.reissued = 0
        self._next_id = 0
        self._issued: dict[tuple[int, str], float] = {}  # (chunk, device) -> when handed out
        if self.policy.mode == "static":
            self._split_static()

    def _split_static(self) -> None:
        parts = len(self.devices)
        bounds = [self.n_items * i // parts for i in range(parts + 1)]
        for i, stats in enumerate(self.devices.values()):
            if bounds[i + 1] > bounds[i]:
                stats.own = [(bounds[i], bounds[i + 1])]
        self.pending = []

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        return self.done_items == self.n_items

    @property
    def live(self) -> list[str]:
        return [d for d, s in self.devices.items() if not s.dropped]

    def is_done(self, item: int) -> bool:
        return bool(self._done[item])

    def chunk_size(self, device: str) -> int:
        """The size of *device*'s next chunk (dynamic mode)."""
        p, stats = self.policy, self.devices[device]
        if stats.rate is None:
            return p.first_items
        size = stats.rate * p.target_s
        left = sum(b - a for a, b in self.pending)
        total_rate = sum(s.rate or stats.rate for s in self.devices.values() if not s.dropped)
        share = left * stats.rate / max(total_rate, 1e-9)
        size = min(size, math.ceil(share / 2))
        return int(max(p.min_items, min(p.max_items, size)))

    # ------------------------------------------------------------------ handing out
    def next(self, device: str, now: float) -> Chunk | None:
        """The next chunk for idle *device*, or None (nothing for it now: ask again later, or
        the job is finished, or the device was dropped)."""
        stats = self.devices[device]
        if stats.dropped or self.finished:
            return None
        span = None
        if self.policy.mode == "static":
            span = _take(stats.own, self.policy.max_items)
        if span is None:
            size = self.policy.max_items if self.policy.mode == "static" else self.chunk_size(device)
            span = _take(self.pending, size)
        if span is not None:
            chunk = Chunk(self._next_id, *span)
            self._next_id += 1
            self.flight[chunk.id] = _InFlight(chunk, {device: now})
            self._issued[chunk.id, device] = now
            stats.chunks += 1
            return chunk
        if self.policy.mode == "dynamic" and self.policy.reissue:
            return self._reissue(device, now)
        return None

    def _eta(self, device: str, size: int) -> float:
        rates = [s.rate for s in self.devices.values() if s.rate]
        rate = self.devices[device].rate or (sum(rates) / len(rates) if rates else None)
        return math.inf if not rate else size / rate

    def _finish(self, device: str, started: float, size: int, now: float) -> float:
        """When *device* should finish a chunk of *size* it began at *started*; one that is
        overdue (slower than measured, or stuck) is taken to need as long again as it took."""
        expected = started + self._eta(device, size)
        return expected if expected >= now else now + (now - started)

    def _reissue(self, device: str, now: float) -> Chunk | None:
        """A copy of the in-flight chunk expected to finish last, if *device* would finish it
        sooner than its holders."""
        best: tuple[float, _InFlight] | None = None
        for f in self.flight.values():
            if device in f.holders or f.copies >= self.policy.max_copies:
                continue
            finish = min(self._finish(d, t, f.chunk.size, now) for d, t in f.holders.items())
            if best is None or finish > best[0]:
                best = (finish, f)
        if best is None or now + self._eta(device, best[1].chunk.size) >= best[0]:
            return None
        f = best[1]
        f.holders[device] = now
        self._issued[f.chunk.id, device] = now
        f.copies += 1
        self.reissued += 1
        self.devices[device].reissued += 1
        self.devices[device].chunks += 1
        return Chunk(f.chunk.id, f.chunk.start, f.chunk.stop, copy=f.copies - 1)

    # ------------------------------------------------------------------ results
    def complete(self, device: str, chunk: Chunk, now: float) -> list[int]:
        """*device* answered *chunk*: the items recorded now (those no other copy answered
        first, in order); the device's rate is updated."""
        stats = self.devices[device]
        started = self._issued.pop((chunk.id, device), None)
        if started is not None:
            took = max(now - started, 1e-6)
            stats.busy_s += took
            stats.processed += chunk.size
            rate = chunk.size / took
            stats.rate = rate if stats.rate is None else self.policy.alpha * rate + (1 - self.policy.alpha) * stats.rate
        stats.failures_in_row = 0
        new = [i for i in range(chunk.start, chunk.stop) if not self._done[i]]
        for i in new:
            self._done[i] = 1
        self.done_items += len(new)
        stats.items += len(new)
        dup = chunk.size - len(new)
        stats.duplicates += dup
        self.duplicates += dup
        self.flight.pop(chunk.id, None)  # first result wins: later copies find it gone
        return new

    def fail(self, device: str, chunk: Chunk, now: float) -> bool:
        """*device*'s request for *chunk* failed: its items go back to the queue (unless another
        device still holds a copy); True while the device stays in, False once it is dropped."""
        stats = self.devices[device]
        stats.failures += 1
        stats.failures_in_row += 1
        self._issued.pop((chunk.id, device), None)
        f = self.flight.get(chunk.id)
        if f is not None:
            f.holders.pop(device, None)
            f.copies -= 1
            if not f.holders:
                self.flight.pop(chunk.id)
                self._requeue(chunk.start, chunk.stop)
        if stats.failures_in_row >= self.policy.max_failures:
            self.drop(device)
        return not stats.dropped

    def drop(self, device: str) -> None:
        """Take *device* out: its static share and the chunks only it held go back to the queue."""
        stats = self.devices[device]
        stats.dropped = True
        for start, stop in stats.own:
            self._requeue(start, stop)
        stats.own = []
        for cid, f in list(self.flight.items()):
            if f.holders.pop(device, None) is not None:
                f.copies -= 1
                if not f.holders:
                    self.flight.pop(cid)
                    self._requeue(f.chunk.start, f.chunk.stop)

    def _requeue(self, start: int, stop: int) -> None:
        """Put the undone items of ``start .. stop-1`` back, in order."""
        i = start
        while i < stop:
            if self._done[i]:
                i += 1
                continue
            j = i
            while j < stop and not self._done[j]:
                j += 1
            self.pending.append((i, j))
            self.requeued += j - i
            i = j
        self.pending.sort()

    def summary(self) -> dict[str, dict[str, float | int | bool | None]]:
        """Per device: items recorded, share, rate (items/s: the moving average, and
        ``mean_rate`` over the whole job), chunks, re-issued copies, duplicates dropped,
        failures, dropped."""
        out: dict[str, dict[str, float | int | bool | None]] = {}
        for d, s in self.devices.items():
            out[d] = {
                "items": s.items, "share": round(s.items / self.n_items, 4) if self.n_items else 0.0,
                "rate": round(s.rate, 2) if s.rate else None, "chunks": s.chunks, "reissued": s.reissued,
                "mean_rate": round(s.processed / s.busy_s, 2) if s.busy_s else None,
                "duplicates": s.duplicates, "failures": s.failures, "dropped": s.dropped,
                "busy_s": round(s.busy_s, 3),
            }  # fmt: skip
        return out


__all__ = ["MODES", "Chunk", "ChunkPolicy", "DeviceStats", "Scheduler"]
