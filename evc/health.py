"""Device health: the SSH check, the sweep over the fleet, the state machine, heartbeats, and
the rule that offline devices get no new work.

States and hysteresis (:func:`assess`, a pure function):

* a failed check is a *miss*. ``health_degraded_after`` consecutive misses make an online
  device ``degraded``; ``health_offline_after`` consecutive misses make it ``offline``;
* a good check resets the misses. A device whose load, memory, disk or temperature exceeds its
  threshold is ``degraded``, otherwise ``online``. The load threshold is per CPU: the 1-minute
  load average is divided by the CPU count from the device's facts (a device whose count is
  unknown counts as one CPU);
* leaving ``offline`` takes ``health_recover_after`` consecutive good checks (default 2), so a
  flapping device does not bounce between offline and online on every sweep. A heartbeat the
  device pushes with its own token is proof enough on its own (it brings a device back at once).

A sweep checks every registered device (those with a pinned host key) concurrently over the
pooled connections of :mod:`evc.pool`, one command per device, and records every result in one
pipelined write. Partial failure is data: a sweep returns results *and* failures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh, webhooks
from evc.errors import DeviceError, DeviceOffline, PreconditionFailed, ValidationError
from evc.model import (
    HEALTH_STATES,
    JSON,
    OFFLINE_STATES,
    UNSWEPT_STATES,
    Device,
    DeviceState,
    Health,
    HealthSource,
    OfflinePolicy,
)
from evc.settings import Settings
from evc.store import Store, now

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "load1",
    "load5",
    "load15",
    "mem_used_ratio",
    "disk_used_ratio",
    "temperature_c",
    "uptime_s",
)
SWEEP_LOCK = "health-sweep"
#: the device fields a sweep reads (the facts for the CPU count the load threshold is per)
SWEEP_FIELDS = ("name", "host", "port", "username", "host_key", "jump_host", "state", "health", "facts")

# One POSIX sh script, sent as the command itself: shell builtins read /proc and /sys, so the
# only process it starts is `df`. One ``key=value`` line per value; :func:`parse_health` reads it.
CHECK = r"""read a b c _ < /proc/loadavg && echo "load=$a $b $c"
read u _ < /proc/uptime && echo "uptime=$u"
while read k v _; do case $k in MemTotal:|MemAvailable:|MemFree:|Buffers:|Cached:) echo "mem.${k%:}=$v";; esac; done < /proc/meminfo
for f in /sys/class/thermal/thermal_zone*/temp; do [ -r "$f" ] && read t < "$f" && echo "temp=$t"; done
echo "df:"; df -Pk / 2>/dev/null
"""  # noqa: E501


# ---------------------------------------------------------------------- parsing (pure)
def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_health(text: str) -> JSON:
    """Turn :data:`CHECK`'s output into metrics; a value it cannot read is None (pure)."""
    out: JSON = dict.fromkeys(METRIC_KEYS)
    mem: dict[str, float] = {}
    temps: list[float] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if line.startswith("df:"):
            rows = [r.split() for r in lines[i + 1 :] if r.strip()]
            if len(rows) >= 2 and len(rows[-1]) >= 6:
                used, avail = _float(rows[-1][-4]), _float(rows[-1][-3])
                if used is not None and avail is not None and used + avail > 0:
                    out["disk_used_ratio"] = round(used / (used + avail), 4)
            break
        if not sep:
            continue
        if key == "load":
            parts = [_float(p) for p in value.split()]
            if len(parts) == 3:
                out["load1"], out["load5"], out["load15"] = parts
        elif key == "uptime":
            out["uptime_s"] = _float(value)
        elif key == "temp":
            t = _float(value)
            if t is not None:
                temps.append(t / 1000.0 if abs(t) >= 1000 else t)  # millidegrees on Linux
        elif key.startswith("mem."):
            kb = _float(value.split()[0]) if value.split() else None
            if kb is not None:
                mem[key[4:].rstrip(":")] = kb
    total = mem.get("MemTotal")
    if total:
        avail = mem.get("MemAvailable")
        if avail is None and "MemFree" in mem:
            avail = mem["MemFree"] + mem.get("Buffers", 0.0) + mem.get("Cached", 0.0)
        if avail is not None:
            out["mem_used_ratio"] = round(min(1.0, max(0.0, 1.0 - avail / total)), 4)
    if temps:
        out["temperature_c"] = round(max(temps), 1)
    return out


# ---------------------------------------------------------------------- the state machine (pure)
@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds and hysteresis of the state machine."""

    degraded_after: int = 1
    offline_after: int = 3
    recover_after: int = 2
    load_per_cpu_threshold: float = 2.0
    mem_threshold: float = 0.95
    disk_threshold: float = 0.95
    temp_threshold_c: float = 85.0

    @classmethod
    def from_settings(cls, s: Settings) -> HealthPolicy:
        return cls(
            degraded_after=max(1, s.health_degraded_after),
            offline_after=max(1, s.health_offline_after),
            recover_after=max(1, s.health_recover_after),
            load_per_cpu_threshold=s.health_load_per_cpu_threshold,
            mem_threshold=s.health_mem_threshold,
            disk_threshold=s.health_disk_threshold,
            temp_threshold_c=s.health_temp_threshold_c,
        )


@dataclass(frozen=True)
class Observation:
    """One look at a device: metrics when it answered, else the error (a DeviceError dict)."""

    ok: bool
    metrics: JSON = field(default_factory=dict)
    error: JSON | None = None
    source: str = HealthSource.SSH

    @classmethod
    def failed(cls, exc: DeviceError, source: str = HealthSource.SSH) -> Observation:
        err = exc.to_dict()
        err.pop("device_id", None)
        return cls(False, {}, err, source)


@dataclass(frozen=True)
class Assessment:
    """The outcome of :func:`assess`: the new state, the health record, why."""

    previous: str
    state: str
    health: Health
    reason: str

    @property
    def changed(self) -> bool:
        return self.state != self.previous


def cpus_of(dev: Mapping[str, Any]) -> int | None:
    """The device's CPU count from its facts (None when unknown)."""
    cpus = (dev.get("facts") or {}).get("cpus")
    return cpus if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0 else None


def breaches(metrics: JSON, policy: HealthPolicy, cpus: int | None = None) -> list[str]:
    """Which thresholds *metrics* exceed, in words (values that are missing exceed nothing).
    The load average is divided by *cpus* (unknown: one CPU) before it is compared."""
    out = []
    load, n = metrics.get("load1"), max(1, cpus or 1)
    if isinstance(load, int | float) and load / n > policy.load_per_cpu_threshold:
        out.append(f"load {load:g} on {n} CPU{'s' if n > 1 else ''} > {policy.load_per_cpu_threshold:g} per CPU")
    checks = (
        ("mem_used_ratio", policy.mem_threshold, "memory {v:.0%} used > {t:.0%}"),
        ("disk_used_ratio", policy.disk_threshold, "disk {v:.0%} used > {t:.0%}"),
        ("temperature_c", policy.temp_threshold_c, "temperature {v:g} °C > {t:g} °C"),
    )
    for key, limit, words in checks:
        v = metrics.get(key)
        if isinstance(v, int | float) and v > limit:
            out.append(words.format(v=v, t=limit))
    return out


def assess(
    state: str | None,
    health: Mapping[str, Any] | None,
    obs: Observation,
    policy: HealthPolicy,
    at: float,
    cpus: int | None = None,
) -> Assessment:
    """The device's next state and health record after *obs* on a device with *cpus* CPUs
    (pure; see the module doc)."""
    prev: str = state if state in HEALTH_STATES else DeviceState.OFFLINE
    before = dict(health or {})
    misses = int(before.get("misses") or 0)
    streak = int(before.get("ok_streak") or 0)
    last_metrics = {k: before.get(k) for k in METRIC_KEYS}
    new: str
    rec: Health
    if obs.ok:
        streak += 1
        over = breaches(obs.metrics, policy, cpus)
        if prev == DeviceState.OFFLINE and streak < policy.recover_after:
            new, reason = DeviceState.OFFLINE, f"recovering: {streak} of {policy.recover_after} checks good"
        elif over:
            new, reason = DeviceState.DEGRADED, "; ".join(over)
        else:
            new, reason = DeviceState.ONLINE, ("ok" if prev == DeviceState.ONLINE else "recovered")
        if obs.source == HealthSource.HEARTBEAT and new != prev:
            reason = f"heartbeat: {reason}"
        rec = {
            **last_metrics,  # type: ignore[typeddict-item]  # the METRIC_KEYS
            **{k: obs.metrics.get(k) for k in METRIC_KEYS if k in obs.metrics},
            "misses": 0,
            "ok_streak": streak,
            "checked_at": at,
            "error": None,
            "source": obs.source,
            "breaches": over,
        }
        return Assessment(str(state or prev), new, rec, reason)
    misses += 1
    if misses >= policy.offline_after:
        new = DeviceState.OFFLINE
    elif misses >= policy.degraded_after:
        new = DeviceState.OFFLINE if prev == DeviceState.OFFLINE else DeviceState.DEGRADED
    else:
        new = prev
    err = obs.error or {"reason": "error", "message": "no answer"}
    plural = "s" if misses > 1 else ""
    reason = f"{err.get('reason', 'error')}: {misses} consecutive missed check{plural}"
    rec = {
        **last_metrics,  # type: ignore[typeddict-item]  # the METRIC_KEYS
        "misses": misses,
        "ok_streak": 0,
        "checked_at": at,
        "error": err,
        "source": obs.source,
        "breaches": list(before.get("breaches") or []),
    }
    return Assessment(str(state or prev), new, rec, reason)


def verified(state: str | None, health: Mapping[str, Any] | None, at: float) -> Assessment:
    """The device's state after a connection with its pinned keys succeeded outside a sweep
    (a re-pin, a fact refresh, new connection details): proof enough that it is reachable, as
    a heartbeat is. The misses end (a later miss starts counting from one, not from where the
    old ones stopped), and it is ``online`` — or stays ``degraded`` when that was for a
    threshold its last check breached (the probe measures no load). Pure."""
    prev = state if state in HEALTH_STATES else DeviceState.OFFLINE
    before = dict(health or {})
    over = list(before.get("breaches") or [])
    if prev == DeviceState.DEGRADED and over and not int(before.get("misses") or 0):
        new, reason = DeviceState.DEGRADED, "; ".join(over)
    else:
        new, reason = DeviceState.ONLINE, ("ok" if prev == DeviceState.ONLINE else "reachable with its pinned keys")
    rec: Health = {
        **before,  # type: ignore[typeddict-item]  # a health record
        "misses": 0,
        "ok_streak": max(1, int(before.get("ok_streak") or 0)),
        "checked_at": at,
        "error": None,
        "source": HealthSource.PROBE,
    }
    return Assessment(str(state or prev), new, rec, reason)


# ---------------------------------------------------------------------- checking one device
async def check_device(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings) -> JSON:
    """Run the health command once over *conn* and return the metrics. Raises DeviceError."""
    res = await ssh.run(conn, CHECK, target, settings, timeout=settings.health_timeout_s)
    metrics = parse_health(str(res.stdout or ""))
    if metrics["load1"] is None and metrics["uptime_s"] is None:
        raise DeviceError(
            f"{target.address} answered the health check with nothing readable "
            "(is /proc mounted and the login shell POSIX?)",
            device_id=target.device_id,
        )
    return metrics


async def observe(pool: pooling.SSHPool, devices: list[JSON], settings: Settings) -> dict[str, Observation]:
    """Check every device concurrently through *pool*; never raises for one device."""

    async def one(dev: JSON) -> tuple[str, Observation]:
        async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> JSON:
            return await check_device(conn, target, settings)

        try:
            return dev["id"], Observation(True, await pool.use(dev, op))
        except DeviceError as exc:
            return dev["id"], Observation.failed(exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not fail the whole sweep
            log.exception("health check of %s crashed", dev["id"])
            return dev["id"], Observation.failed(DeviceError(f"internal error: {exc!r}"))

    return dict(await asyncio.gather(*(one(d) for d in devices)))


# ---------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """What a sweep saw: metrics of devices that answered, errors of those that did not."""

    started_at: float
    duration_s: float = 0.0
    results: dict[str, JSON] = field(default_factory=dict)
    failures: dict[str, JSON] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # device id -> why
    changes: list[JSON] = field(default_factory=list)  # the device.state events

    def per_device(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        for d, m in self.results.items():
            out[d] = {"ok": True, "state": self.states.get(d), "health": m}
        for d, e in self.failures.items():
            out[d] = {"ok": False, "state": self.states.get(d), "error": e}
        for d, why in self.skipped.items():
            out[d] = {"ok": False, "skipped": why}
        return out

    def summary(self) -> JSON:
        return {
            "checked": len(self.results) + len(self.failures),
            "ok": len(self.results),
            "failed": len(self.failures),
            "skipped": len(self.skipped),
            "state_changes": len(self.changes),
            "states": dict(Counter(self.states.values())),
            "duration_s": round(self.duration_s, 3),
        }


def sweepable(dev: JSON) -> str | None:
    """Why a sweep leaves *dev* alone, or None when it checks it."""
    if dev.get("state") in UNSWEPT_STATES:
        return f"state {dev.get('state')}"
    if not dev.get("host_key"):
        return "no pinned host key (registration has not succeeded)"
    return None


def sweep(
    store: Store,
    settings: Settings,
    device_ids: Iterable[str] | None = None,
    *,
    pool: pooling.SSHPool | None = None,
) -> SweepResult:
    """Check every registered device (or *device_ids*) and record the outcome; see module doc."""
    t0 = time.monotonic()
    result = SweepResult(started_at=now())
    if device_ids is None:
        devices = store.device_fields(None, SWEEP_FIELDS)
    else:
        wanted = list(dict.fromkeys(device_ids))
        devices = store.device_fields(wanted, SWEEP_FIELDS)
        found = {d["id"] for d in devices}
        result.skipped.update({d: "not found" for d in wanted if d not in found})
    eligible = []
    for dev in devices:
        why = sweepable(dev)
        if why:
            result.skipped[dev["id"]] = why
        else:
            eligible.append(dev)
    pool = pool or pooling.pool_for(settings)
    mark = (pool.opened, pool.closed)
    observations = pooling.call(observe(pool, eligible, settings)) if eligible else {}
    at = now()
    policy = HealthPolicy.from_settings(settings)
    changes: dict[str, JSON] = {}
    for dev in eligible:
        obs = observations[dev["id"]]
        a = assess(dev.get("state"), dev.get("health"), obs, policy, at, cpus_of(dev))
        fields: JSON = {"health": a.health}
        if obs.ok:
            fields["last_seen"] = at
            result.results[dev["id"]] = obs.metrics
        else:
            result.failures[dev["id"]] = obs.error or {}
        if a.changed:
            fields["state"] = a.state
            result.changes.append(state_event(dev, a))
        changes[dev["id"]] = fields
        result.states[dev["id"]] = a.state
    if changes or result.changes:
        store.record_health(changes, result.changes)
    if device_ids is None:  # the whole fleet: close connections of removed devices
        pooling.call(pool.prune({d["id"] for d in eligible}))
    pooling.settle(pool, mark)
    result.duration_s = time.monotonic() - t0
    publish(settings, result.changes)
    _metric("observe_health_sweep", result.duration_s)  # devices by state come from the registry
    return result


def state_event(dev: Mapping[str, Any], a: Assessment) -> JSON:
    return {
        "type": "device.state",
        "device": dev["id"],
        "name": dev.get("name", ""),
        "from": a.previous,
        "to": a.state,
        "reason": a.reason,
    }


@contextmanager
def sweep_lock(store: Store, settings: Settings, owner: str, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the fleet-wide sweep lock (so overlapping sweeps do not count misses twice).

    Yields False when it could not be had within *wait_s*. The lock expires after the task
    time limit, so a killed worker cannot hold it for ever."""
    ttl = float(settings.task_time_limit_s)
    deadline = time.monotonic() + wait_s
    got = store.acquire_lock(SWEEP_LOCK, owner, ttl)
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
        got = store.acquire_lock(SWEEP_LOCK, owner, ttl)
    try:
        yield got
    finally:
        if got:
            store.release_lock(SWEEP_LOCK, owner)


# ---------------------------------------------------------------------- heartbeats
def record_heartbeat(store: Store, settings: Settings, device_id: str, data: JSON) -> Device:
    """A device said it is alive: misses reset, metrics recorded, and a device that was offline,
    degraded or unreachable comes back (a heartbeat is proof enough: no hysteresis)."""
    dev = store.get_device(device_id)
    if not dev.get("host_key"):
        raise PreconditionFailed(
            f"device {dev.get('name') or device_id} has not completed registration (EVC has not reached it and "
            "pinned its host key); heartbeats are accepted once its registration job succeeded",
            reason="not_registered",
        )
    at = now()
    state = dev.get("state")
    policy = dataclasses.replace(HealthPolicy.from_settings(settings), recover_after=1)
    a = assess(
        state, dev.get("health"), Observation(True, dict(data), source=HealthSource.HEARTBEAT), policy, at, cpus_of(dev)
    )
    changes: JSON = {"last_seen": at, "health": a.health}
    events = []
    if state in HEALTH_STATES or state in OFFLINE_STATES:  # not while registration runs
        if a.changed:
            changes["state"] = a.state
            events.append(state_event(dev, a))
    store.record_health({device_id: changes}, events)
    publish(settings, events)
    return store.get_device(device_id)


# ---------------------------------------------------------------------- state changes go out
def publish(settings: Settings, events: list[JSON]) -> threading.Thread | None:
    """Metrics for each state change, and the webhook (in the background, best effort)."""
    for ev in events:
        _metric("record_device_state_change", ev["from"], ev["to"])
    if not events:
        return None
    return webhooks.post(settings, webhook_body(events))


def webhook_body(events: list[JSON]) -> JSON:
    """One POST per batch of state changes: a Slack-style ``text`` line and the events."""
    lines = [f"{e.get('name') or e['device']}: {e['from']} → {e['to']} ({e['reason']})" for e in events]
    return {"type": "device.state", "text": "\n".join(lines), "events": events}


def _metric(name: str, *args: Any) -> None:
    fn = pooling.optional_metric(name)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - metrics never break a sweep
        log.debug("metric %s failed", name, exc_info=True)


# ---------------------------------------------------------------------- no work to offline devices
def ensure_online(
    store: Store,
    device_ids: Iterable[str],
    policy: str = OfflinePolicy.FAIL,
    *,
    ttl_s: float = 300.0,
    poll_s: float = 1.0,
    check_cancel: Any = None,
) -> list[Device]:
    """Refuse new work for offline devices: return the devices when none is offline.

    ``policy="fail"`` raises :class:`~evc.errors.DeviceOffline` at once, listing them;
    ``policy="wait"`` polls the store until they are back or *ttl_s* has passed, then raises.
    *check_cancel* (e.g. ``JobRun.check_cancel``) is called between polls."""
    if policy not in (OfflinePolicy.FAIL, OfflinePolicy.WAIT):
        raise ValidationError(f"offline policy must be 'fail' or 'wait', not {policy!r}", field="policy")
    ids = list(dict.fromkeys(device_ids))
    deadline = time.monotonic() + (ttl_s if policy == OfflinePolicy.WAIT else 0.0)
    while True:
        devices = store.get_devices(ids)
        found = {d["id"] for d in devices}
        missing = [i for i in ids if i not in found]
        if missing:
            from evc.errors import NotFound

            raise NotFound(f"devices not found: {', '.join(missing)}", ids=missing)
        offline = [d for d in devices if d.get("state") in OFFLINE_STATES]
        if not offline:
            return devices
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(f"{d.get('name') or d['id']} ({d.get('state')})" for d in offline)
            waited = f" after waiting {ttl_s:g}s" if policy == OfflinePolicy.WAIT else ""
            raise DeviceOffline(
                f"{len(offline)} target device(s) offline{waited}: {names}; no work is sent to offline devices",
                device_id=offline[0]["id"],
                devices=[d["id"] for d in offline],
                policy=policy,
            )
        if check_cancel is not None:
            check_cancel()
        time.sleep(min(poll_s, remaining))


__all__ = [
    "CHECK",
    "HEALTH_STATES",
    "OFFLINE_STATES",
    "UNSWEPT_STATES",
    "Assessment",
    "HealthPolicy",
    "Observation",
    "SweepResult",
    "assess",
    "breaches",
    "check_device",
    "cpus_of",
    "verified",
    "ensure_online",
    "observe",
    "parse_health",
    "publish",
    "record_heartbeat",
    "sweep",
    "sweep_lock",
]
