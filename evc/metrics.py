"""EVC's own Prometheus metrics: definitions, the calls that record them, and their exposition.

Multiprocess mode: gunicorn and Celery prefork run many processes, each with its own counters.
prometheus_client merges them through files in a directory named by ``PROMETHEUS_MULTIPROC_DIR``,
which must be in the environment *before* prometheus_client is imported, so whoever launches
the API or the workers puts it there (see :func:`multiprocess_env`) from ``Settings.metrics_dir``.
API and workers use separate subdirectories so their series are exposed once each: the API's
``/metrics`` serves :func:`registry_for_exposition` of ``<metrics_dir>/api`` plus
:class:`FleetCollector`, and ``/metrics/workers`` serves ``<metrics_dir>/workers``.

Per-device series come only from :class:`FleetCollector`, computed from the store at scrape
time, so a removed device's series disappear with it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from evc.model import RUNNABLE_STATES, DeviceState, strings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
Role = Literal["api", "workers"]

#: device states always present in ``evc_devices`` (as 0 when no device is in them)
DEVICE_STATES: tuple[str, ...] = strings(
    DeviceState.PENDING, DeviceState.ONLINE, DeviceState.DEGRADED, DeviceState.OFFLINE, DeviceState.FAILED
)
#: states in which a device counts as up for ``evc_device_up``
UP_STATES: frozenset[str] = frozenset(RUNNABLE_STATES)

JOB_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
SWEEP_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

#: EVC's metric definitions; exposed by :func:`registry_for_exposition` (single-process mode)
REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Counter(
    "evc_jobs_total",
    "Jobs that reached a final state, by kind and final state.",
    ["kind", "state"],
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "evc_job_duration_seconds",
    "Time from a job's start to its final state.",
    ["kind"],
    buckets=JOB_DURATION_BUCKETS,
    registry=REGISTRY,
)
REGISTRATION_FAILURES = Counter(
    "evc_registration_failures_total",
    "Device registrations that failed, by reason.",
    ["reason"],
    registry=REGISTRY,
)
DEVICE_STATE_CHANGES = Counter(
    "evc_device_state_changes_total",
    "Device state transitions seen by health checks (online, degraded, offline ...).",
    ["from_state", "to_state"],
    registry=REGISTRY,
)
HEALTH_SWEEP_DURATION = Histogram(
    "evc_health_sweep_duration_seconds",
    "Time one health sweep over the fleet took.",
    buckets=SWEEP_DURATION_BUCKETS,
    registry=REGISTRY,
)
SSH_POOL_CONNECTIONS = Gauge(
    "evc_ssh_pool_connections",
    "Open pooled SSH connections, summed over live worker processes.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
# Federated rounds are labelled fl_job, not job: a scraped "job" label collides with the
# target's job label and Prometheus renames it to exported_job.
FL_ROUND = Gauge(
    "evc_fl_round",
    "Number of the latest completed round of a federated training job.",
    ["fl_job"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FL_ROUND_DURATION = Gauge(
    "evc_fl_round_duration_seconds",
    "Duration of the latest completed round of a federated training job.",
    ["fl_job"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FL_ROUND_PARTICIPANTS = Gauge(
    "evc_fl_round_participants",
    "Devices whose updates were aggregated in the latest round.",
    ["fl_job"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
FL_ROUND_ACCURACY = Gauge(
    "evc_fl_round_accuracy",
    "Evaluation accuracy (0..1) after the latest round.",
    ["fl_job"],
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
_FL_GAUGES = (FL_ROUND, FL_ROUND_DURATION, FL_ROUND_PARTICIPANTS, FL_ROUND_ACCURACY)


# --- recording: the calls the rest of EVC makes -----------------------------------------------


def record_job_finished(kind: str, state: str, duration_s: float | None) -> None:
    """A job reached a final state (succeeded, partial, failed, cancelled) after *duration_s* seconds."""
    JOBS.labels(kind=kind, state=state).inc()
    if duration_s is not None and duration_s >= 0:
        JOB_DURATION.labels(kind=kind).observe(duration_s)


def record_registration_failure(reason: str) -> None:
    """A device registration failed; *reason* is the error's short machine-readable reason."""
    REGISTRATION_FAILURES.labels(reason=reason or "unknown").inc()


def observe_health_sweep(seconds: float) -> None:
    """A health sweep over the fleet finished in *seconds*."""
    HEALTH_SWEEP_DURATION.observe(seconds)


def record_device_state_change(from_state: str, to_state: str) -> None:
    """A device moved from one state to another (health state machine)."""
    DEVICE_STATE_CHANGES.labels(from_state=from_state or "unknown", to_state=to_state or "unknown").inc()


def set_ssh_pool_size(n: int) -> None:
    """This process's SSH pool now holds *n* connections."""
    SSH_POOL_CONNECTIONS.set(n)


def record_fl_round(job_id: str, round: int, participants: int, duration_s: float, accuracy: float | None) -> None:
    """Federated job *job_id* completed *round* with *participants* devices."""
    FL_ROUND.labels(fl_job=job_id).set(round)
    FL_ROUND_DURATION.labels(fl_job=job_id).set(duration_s)
    FL_ROUND_PARTICIPANTS.labels(fl_job=job_id).set(participants)
    if accuracy is not None:
        FL_ROUND_ACCURACY.labels(fl_job=job_id).set(accuracy)


def remove_fl_job(job_id: str) -> None:
    """Drop a finished or deleted federated job's series from this process.

    In multiprocess mode the values other processes wrote stay in their files until the
    directory is cleared at the next start; prometheus_client cannot delete them.
    """
    for g in _FL_GAUGES:
        try:
            g.remove(job_id)
        except KeyError:
            pass


# --- scrape-time fleet metrics ----------------------------------------------------------------


class FleetStore(Protocol):
    """What :class:`FleetCollector` needs from the store."""

    def all_devices(self) -> Sequence[Mapping[str, Any]]: ...

    def queue_lengths(self) -> Mapping[str, int]: ...


def _level(raw: Any) -> float | None:
    """A function level as a number: 2, "2" and "L2" are all 2."""
    if raw is None or raw == "":
        return None
    try:
        return float(str(raw).upper().removeprefix("L"))
    except ValueError:
        return None


class FleetCollector:
    """Devices by state, queue lengths and per-device up, computed from the store at scrape time.

    Register it on the registry returned by :func:`registry_for_exposition` (never in the
    multiprocess files): it reads the store when Prometheus scrapes, so a device deleted from
    the store has no series at the next scrape.
    """

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store_up = GaugeMetricFamily("evc_store_up", "Whether the fleet could be read from the store.")
        try:
            devices = self.store.all_devices()
            queues = dict(self.store.queue_lengths())
        except Exception:  # noqa: BLE001 - a broken store must not break the whole /metrics page
            log.warning("fleet metrics: store unreadable", exc_info=True)
            store_up.add_metric([], 0.0)
            yield store_up
            return
        store_up.add_metric([], 1.0)
        yield store_up
        yield from fleet_families(devices, queues)


def fleet_families(devices: Sequence[Mapping[str, Any]], queues: Mapping[str, int]) -> list[Metric]:
    """The fleet families for a list of device records and queue lengths (pure)."""
    by_state = GaugeMetricFamily("evc_devices", "Registered devices by state.", labels=["state"])
    tally = Tally(str(d.get("state") or "unknown") for d in devices)
    for state in DEVICE_STATES:
        by_state.add_metric([state], float(tally.pop(state, 0)))
    for state, n in sorted(tally.items()):
        by_state.add_metric([state], float(n))

    queue = GaugeMetricFamily("evc_queue_length", "Messages waiting in a Celery queue.", labels=["queue"])
    for name, n in sorted(queues.items()):
        queue.add_metric([name], float(n))

    labels = ["device", "cluster"]
    up = GaugeMetricFamily(
        "evc_device_up",
        "Whether the device is online or degraded (1) rather than pending or offline (0).",
        labels=labels,
    )
    level = GaugeMetricFamily("evc_device_level", "Function level the device has reached (0..4).", labels=labels)
    info = GaugeMetricFamily(
        "evc_device_info",
        "Device identity; always 1.",
        labels=["device", "cluster", "device_id", "arch", "state"],
    )
    for d in devices:
        name = str(d.get("name") or d.get("id") or "")
        cluster = str(d.get("cluster_id") or "")
        facts = d.get("facts") or {}
        up.add_metric([name, cluster], 1.0 if d.get("state") in UP_STATES else 0.0)
        lvl = _level(d.get("level"))
        if lvl is not None:
            level.add_metric([name, cluster], lvl)
        info.add_metric(
            [
                name,
                cluster,
                str(d.get("id") or ""),
                str(facts.get("arch") or ""),
                str(d.get("state") or ""),
            ],
            1.0,
        )
    return [by_state, queue, up, level, info]


# --- exposition and multiprocess plumbing -----------------------------------------------------


def multiprocess_enabled() -> bool:
    """Whether this process's metrics are written to multiprocess files."""
    return values.ValueClass is not values.MutexValue


def multiprocess_dir(metrics_dir: str | os.PathLike[str], role: Role) -> Path:
    """The subdirectory of ``Settings.metrics_dir`` that processes of *role* write to."""
    return Path(metrics_dir) / role


def multiprocess_env(metrics_dir: str, role: Role) -> dict[str, str]:
    """Environment for a child process (gunicorn, celery worker) of *role*; empty if off."""
    if not metrics_dir:
        return {}
    return {MULTIPROC_ENV: str(multiprocess_dir(metrics_dir, role))}


def reset_multiprocess_dir(path: str | os.PathLike[str]) -> Path:
    """Create *path* and remove the ``*.db`` files earlier runs left; call before the processes start.

    Only prometheus_client's files are removed, so a mistyped directory loses nothing else.
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    for f in p.glob("*.db"):
        f.unlink()
    return p


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Forget a dead process's live gauges (gunicorn ``child_exit``, Celery process shutdown)."""
    if multiprocess_enabled() or path is not None:
        multiprocess.mark_process_dead(pid, None if path is None else str(path))


class FolderTreeCollector:
    """The multiprocess files of a folder and of its subfolders, merged: one subfolder per
    worker container when the containers share one volume (their process ids repeat, so each
    writes to a folder of its own: deploy/compose/compose.podman.yaml)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def collect(self) -> Iterable[Metric]:
        files = sorted(str(p) for p in self.path.rglob("*.db"))
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def registry_for_exposition(*extra: Collector, metrics_dir: str | os.PathLike[str] | None = None) -> CollectorRegistry:
    """A fresh registry to render one scrape: EVC's metrics plus *extra* collectors.

    In multiprocess mode (or when *metrics_dir* is given) the values are merged from the
    files of every process writing to that directory (and, for *metrics_dir*, its
    subdirectories); otherwise this process's values.
    """
    registry = CollectorRegistry(auto_describe=False)
    if metrics_dir is not None:
        registry.register(FolderTreeCollector(metrics_dir))
    elif multiprocess_enabled():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)
    for collector in extra:
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition body and its Content-Type for an HTTP ``Accept`` header."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type or CONTENT_TYPE_LATEST


def metric_names(families: Iterable[Metric]) -> list[str]:
    """Names of families as exposed (counters with ``_total``); for tests and docs."""
    return [f.name + "_total" if f.type == "counter" else f.name for f in families]


__all__ = [
    "DEVICE_STATES",
    "REGISTRY",
    "FleetCollector",
    "FleetStore",
    "fleet_families",
    "FolderTreeCollector",
    "mark_process_dead",
    "metric_names",
    "multiprocess_dir",
    "multiprocess_enabled",
    "multiprocess_env",
    "observe_health_sweep",
    "record_device_state_change",
    "record_fl_round",
    "record_job_finished",
    "record_registration_failure",
    "registry_for_exposition",
    "remove_fl_job",
    "render",
    "reset_multiprocess_dir",
    "set_ssh_pool_size",
]
