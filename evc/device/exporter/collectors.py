"""Scrape-time collectors of the edge exporter: the degrading base class and the host sources.

Each collector is a prometheus_client custom collector for one source. ``collect()`` never
raises: a source that is missing or broken yields ``evc_edge_collector_up{collector=...} 0``
and no samples of its own. :class:`EdgeExporter` combines collectors into one, merging the
families they share so the exposition has one block per metric name.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .parsers import (
    ParseError,
    parse_loadavg,
    parse_meminfo,
    parse_net_dev,
    parse_proc_stat_cpu,
    parse_thermal_temp,
    parse_uptime,
    process_matches,
    split_cmdline,
)

log = logging.getLogger(__name__)

PREFIX = "evc_edge_"
#: interfaces left out of the network metrics unless configured otherwise
DEFAULT_NET_EXCLUDE = r"^(lo|veth.*|docker.*|br-.*|cni.*|flannel.*|cali.*)$"


class SourceUnavailable(Exception):
    """A collector's source is missing or unreadable on this machine; the collector reports up 0.

    The exporter runs alone on devices without the rest of EVC, so it does not use
    ``evc.errors``.
    """


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def status_families(collector: str, up: bool, seconds: float) -> list[Metric]:
    """``evc_edge_collector_up`` and ``evc_edge_collector_duration_seconds`` for one collector."""
    up_f = gauge(
        "collector_up",
        "Whether the collector's source could be read (1) or not (0).",
        ["collector"],
    )
    up_f.add_metric([collector], 1.0 if up else 0.0)
    dur = gauge("collector_duration_seconds", "Time the collector took at this scrape.", ["collector"])
    dur.add_metric([collector], seconds)
    return [up_f, dur]


class SourceCollector:
    """Base of every edge collector: runs :meth:`read` and turns any failure into up 0."""

    #: the ``collector`` label value
    collector = ""

    def __init__(self) -> None:
        self._last_error: str | None = None

    def read(self) -> Iterable[Metric]:
        """The families of this source; raise :class:`SourceUnavailable` when it is missing."""
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        start = time.perf_counter()
        families: list[Metric] = []
        error: str | None = None
        try:
            families = list(self.read())
        except (SourceUnavailable, ParseError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one broken source must never fail a scrape
            error = f"unexpected {type(exc).__name__}: {exc}"
            log.exception("collector %s failed", self.collector)
        self._note(error)
        yield from families
        yield from status_families(self.collector, error is None, time.perf_counter() - start)

    def _note(self, error: str | None) -> None:
        """Log when the source goes away or comes back, not at every scrape."""
        if error != self._last_error:
            if error:
                log.info("collector %s unavailable: %s", self.collector, error)
            elif self._last_error:
                log.info("collector %s available again", self.collector)
        self._last_error = error

    def close(self) -> None:
        """Release what the collector holds (processes, library handles)."""


def merge_families(families: Iterable[Metric]) -> list[Metric]:
    """Join families of the same name into one, keeping first-seen order."""
    merged: dict[str, Metric] = {}
    for fam in families:
        have = merged.get(fam.name)
        if have is None:
            merged[fam.name] = fam
        elif have.type == fam.type:
            have.samples.extend(fam.samples)
        else:
            log.warning(
                "metric %s collected as %s and %s; dropping the second",
                fam.name,
                have.type,
                fam.type,
            )
    return list(merged.values())


class EdgeExporter:
    """All of a device's collectors as one prometheus_client collector."""

    def __init__(self, collectors: Sequence[SourceCollector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        info = gauge("exporter_build_info", "The EVC edge exporter's version; always 1.", ["version"])
        info.add_metric([__version__], 1.0)
        families: list[Metric] = [info]
        for c in self.collectors:
            families.extend(c.collect())
        yield from merge_families(families)

    def close(self) -> None:
        for c in self.collectors:
            c.close()


# --- host sources -----------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise SourceUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc


class LoadCollector(SourceCollector):
    """Load averages from ``/proc/loadavg``."""

    collector = "loadavg"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        super().__init__()
        self.proc_root = proc_root

    def read(self) -> Iterable[Metric]:
        loads = parse_loadavg(_read_text(self.proc_root / "loadavg"))
        for minutes, value in zip((1, 5, 15), loads):
            f = gauge(f"load{minutes}", f"{minutes}-minute load average.")
            f.add_metric([], value)
            yield f


class MemoryCollector(SourceCollector):
    """RAM and swap from ``/proc/meminfo``."""

    collector = "meminfo"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        super().__init__()
        self.proc_root = proc_root

    def read(self) -> Iterable[Metric]:
        mem = parse_meminfo(_read_text(self.proc_root / "meminfo"))
        available = mem.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = mem.get("MemFree", 0.0) + mem.get("Buffers", 0.0) + mem.get("Cached", 0.0)
        values = (
            ("memory_total_bytes", "Total usable RAM.", mem["MemTotal"]),
            ("memory_available_bytes", "RAM available for new work without swapping.", available),
            ("memory_free_bytes", "Unused RAM.", mem.get("MemFree", 0.0)),
            ("swap_total_bytes", "Total swap space.", mem.get("SwapTotal", 0.0)),
            ("swap_free_bytes", "Unused swap space.", mem.get("SwapFree", 0.0)),
        )
        for name, doc, value in values:
            f = gauge(name, doc)
            f.add_metric([], value)
            yield f


class CpuCollector(SourceCollector):
    """CPU count and CPU time by mode from ``/proc/stat``."""

    collector = "cpu"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        super().__init__()
        self.proc_root = proc_root
        try:
            self.ticks = float(os.sysconf("SC_CLK_TCK"))
        except (ValueError, OSError, AttributeError):
            self.ticks = 100.0

    def read(self) -> Iterable[Metric]:
        count = gauge("cpus", "Number of logical CPUs.")
        count.add_metric([], float(os.cpu_count() or 0))
        yield count
        seconds = counter("cpu_seconds_total", "CPU time spent in each mode, all CPUs summed.", ["mode"])
        for mode, value in parse_proc_stat_cpu(_read_text(self.proc_root / "stat"), self.ticks).items():
            seconds.add_metric([mode], value)
        yield seconds


class UptimeCollector(SourceCollector):
    """Seconds since boot from ``/proc/uptime``."""

    collector = "uptime"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        super().__init__()
        self.proc_root = proc_root

    def read(self) -> Iterable[Metric]:
        f = gauge("uptime_seconds", "Seconds since the device booted.")
        f.add_metric([], parse_uptime(_read_text(self.proc_root / "uptime")))
        yield f


class FilesystemCollector(SourceCollector):
    """Size, free and available space of configured mount points (``statvfs``)."""

    collector = "filesystem"

    def __init__(self, mountpoints: Sequence[str] = ("/",)) -> None:
        super().__init__()
        self.mountpoints = list(dict.fromkeys(mountpoints))

    def read(self) -> Iterable[Metric]:
        labels = ["mountpoint"]
        size = gauge("filesystem_size_bytes", "Filesystem size.", labels)
        free = gauge("filesystem_free_bytes", "Free space, including blocks reserved for root.", labels)
        avail = gauge("filesystem_avail_bytes", "Space available to unprivileged users.", labels)
        ro = gauge("filesystem_readonly", "Whether the filesystem is mounted read-only.", labels)
        err = gauge("filesystem_error", "Whether statvfs failed for the mount point.", labels)
        ok = 0
        for mp in self.mountpoints:
            try:
                st = os.statvfs(mp)
            except OSError as exc:
                log.debug("statvfs %s: %s", mp, exc)
                err.add_metric([mp], 1.0)
                continue
            ok += 1
            err.add_metric([mp], 0.0)
            size.add_metric([mp], float(st.f_blocks * st.f_frsize))
            free.add_metric([mp], float(st.f_bfree * st.f_frsize))
            avail.add_metric([mp], float(st.f_bavail * st.f_frsize))
            ro.add_metric([mp], 1.0 if st.f_flag & os.ST_RDONLY else 0.0)
        if self.mountpoints and not ok:
            raise SourceUnavailable("no configured mount point could be read")
        return [size, free, avail, ro, err]


class NetworkCollector(SourceCollector):
    """Per-interface byte, packet and error counters from ``/proc/net/dev``."""

    collector = "netdev"

    def __init__(self, proc_root: Path = Path("/proc"), exclude: str = DEFAULT_NET_EXCLUDE) -> None:
        super().__init__()
        self.proc_root = proc_root
        self.exclude = re.compile(exclude) if exclude else None

    def read(self) -> Iterable[Metric]:
        counters = parse_net_dev(_read_text(self.proc_root / "net" / "dev"))
        labels = ["interface"]
        fams = {
            "receive_bytes": counter("network_receive_bytes_total", "Bytes received.", labels),
            "transmit_bytes": counter("network_transmit_bytes_total", "Bytes sent.", labels),
            "receive_packets": counter("network_receive_packets_total", "Packets received.", labels),
            "transmit_packets": counter("network_transmit_packets_total", "Packets sent.", labels),
            "receive_errors": counter("network_receive_errors_total", "Receive errors.", labels),
            "transmit_errors": counter("network_transmit_errors_total", "Transmit errors.", labels),
        }
        for iface, c in sorted(counters.items()):
            if self.exclude and self.exclude.match(iface):
                continue
            for attr, fam in fams.items():
                fam.add_metric([iface], float(getattr(c, attr)))
        return list(fams.values())


class ThermalCollector(SourceCollector):
    """Temperatures of ``/sys/class/thermal/thermal_zone*``."""

    collector = "thermal"

    def __init__(self, sys_root: Path = Path("/sys")) -> None:
        super().__init__()
        self.base = sys_root / "class" / "thermal"

    def read(self) -> Iterable[Metric]:
        zones = sorted(self.base.glob("thermal_zone*")) if self.base.is_dir() else []
        temp = gauge("thermal_zone_temperature_celsius", "Temperature of a thermal zone.", ["zone", "type"])
        for zone in zones:
            try:
                kind = (zone / "type").read_text().strip()
                value = parse_thermal_temp((zone / "temp").read_text())
            except (OSError, ParseError) as exc:  # some zones refuse reads (ENODATA, EINVAL)
                log.debug("thermal zone %s: %s", zone, exc)
                continue
            temp.add_metric([zone.name, kind], value)
        if not temp.samples:
            raise SourceUnavailable(f"no readable thermal zone under {self.base}")
        yield temp


class ProcessLivenessCollector(SourceCollector):
    """Whether named processes (camera, inference) are running, by scanning ``/proc``."""

    collector = "process"

    def __init__(self, names: Sequence[str], proc_root: Path = Path("/proc")) -> None:
        super().__init__()
        self.names = list(dict.fromkeys(names))
        self.proc_root = proc_root

    def _processes(self) -> list[tuple[str, list[str]]]:
        found = []
        with os.scandir(self.proc_root) as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                base = Path(entry.path)
                try:
                    comm = (base / "comm").read_text().strip()
                    argv = split_cmdline((base / "cmdline").read_bytes())
                except OSError:  # exited while we looked, or not ours to read
                    continue
                found.append((comm, argv))
        return found

    def read(self) -> Iterable[Metric]:
        if not self.proc_root.is_dir():
            raise SourceUnavailable(f"{self.proc_root} is not readable")
        counts = dict.fromkeys(self.names, 0)
        for comm, argv in self._processes():
            for name in self.names:
                if process_matches(name, comm, argv):
                    counts[name] += 1
        up = gauge("process_up", "Whether at least one process of this name runs.", ["name"])
        count = gauge("processes", "Number of processes of this name.", ["name"])
        for name, n in counts.items():
            up.add_metric([name], 1.0 if n else 0.0)
            count.add_metric([name], float(n))
        return [up, count]
