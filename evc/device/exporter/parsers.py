"""Pure parsers for what the edge exporter reads: nvidia-smi CSV, tegrastats lines, /proc files.

Every function here takes text and returns plain values in base units (bytes, seconds,
celsius, watts, hertz, ratios 0..1). Nothing reads files or runs commands, so each is tested
against recorded outputs. Written for Python 3.8+ (older JetPack images).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Sequence

MIB = 1024 * 1024
KIB = 1024

#: the nvidia-smi query the exporter runs, in this column order
NVIDIA_SMI_FIELDS = (
    "index",
    "name",
    "uuid",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)
NVIDIA_SMI_ARGS = (
    "--query-gpu=" + ",".join(NVIDIA_SMI_FIELDS),
    "--format=csv,noheader,nounits",
)


class ParseError(ValueError):
    """The text is not what the parser expects (wrong tool, truncated output)."""


# --- nvidia-smi -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSample:
    """One GPU as nvidia-smi or NVML reports it, in base units; ``None`` where not supported."""

    index: str
    name: str
    uuid: str
    utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    temperature_celsius: float | None
    power_watts: float | None


def _nvidia_number(raw: str) -> float | None:
    """A numeric nvidia-smi cell, or None for ``[N/A]``, ``[Not Supported]`` and the like."""
    raw = raw.strip()
    if not raw or raw.startswith("[") or raw.upper() in {"N/A", "ERR!", "UNKNOWN ERROR"}:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str) -> list[GpuSample]:
    """Parse ``nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits``.

    Rows that do not have the expected columns are skipped; :class:`ParseError` when the text
    has rows but none parses.
    """
    gpus: list[GpuSample] = []
    rows = [r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if any(c.strip() for c in r)]
    n = len(NVIDIA_SMI_FIELDS)
    for row in rows:
        if len(row) < n:
            continue
        # a product name with a comma in it spreads over several cells: put it back together
        extra = len(row) - n
        name = ", ".join(c.strip() for c in row[1 : 2 + extra])
        index, uuid = row[0].strip(), row[2 + extra].strip()
        util, used, total, temp, power = (_nvidia_number(c) for c in row[3 + extra :])
        if not index.isdigit():
            continue
        gpus.append(
            GpuSample(
                index=index,
                name=name,
                uuid=uuid,
                utilization_ratio=None if util is None else util / 100.0,
                memory_used_bytes=None if used is None else used * MIB,
                memory_total_bytes=None if total is None else total * MIB,
                temperature_celsius=temp,
                power_watts=power,
            )
        )
    if rows and not gpus:
        raise ParseError(f"no GPU row in nvidia-smi output: {text[:200]!r}")
    return gpus


# --- tegrastats -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuCore:
    """One CPU core in a tegrastats ``CPU [..]`` list; an ``off`` core has no load or frequency."""

    index: int
    online: bool
    utilization_ratio: float | None = None
    frequency_hertz: float | None = None


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line in base units. Fields a JetPack version does not print are None/empty."""

    ram_used_bytes: float | None = None
    ram_total_bytes: float | None = None
    swap_used_bytes: float | None = None
    swap_total_bytes: float | None = None
    cpus: tuple[CpuCore, ...] = ()
    gpu_utilization_ratio: float | None = None
    gpu_frequency_hertz: float | None = None
    emc_utilization_ratio: float | None = None
    #: sensor name (lower case, so JetPack 5 ``CPU`` and JetPack 6 ``cpu`` agree) -> celsius
    temperatures_celsius: dict[str, float] = field(default_factory=dict)
    #: rail name -> instantaneous watts
    power_watts: dict[str, float] = field(default_factory=dict)
    #: rail name -> average watts since tegrastats started
    power_average_watts: dict[str, float] = field(default_factory=dict)


_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU_LIST = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
# GR3D_FREQ 23%@921 (JetPack 4), 47%@[816,816] (JetPack 5 Orin, one per GPC), 12% (no clock)
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@(\d+|\[[\d,]*\]))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
# CPU@39C, tj@46.062C, CV0@-256C (a powered-down sensor)
_TEMP = re.compile(r"(?<![\w@%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# POM_5V_IN 2996/2910 (JetPack 4, milliwatts) or VDD_IN 4861mW/4861mW (JetPack 5/6)
_RAIL = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM", "NC"})
#: what a powered-down sensor (CV0@-256C on Orin) reports
_INVALID_TEMPERATURE = -256.0
#: JetPack 4 prints PMIC@100C on boards without a PMIC sensor: a placeholder, not a reading
_PLACEHOLDER_TEMPERATURES = {("pmic", 100.0)}


def _mhz(raw: str | None) -> float | None:
    if not raw:
        return None
    values = [int(v) for v in raw.strip("[]").split(",") if v]
    return max(values) * 1e6 if values else None


def _cpu_cores(raw: str) -> tuple[CpuCore, ...]:
    cores = []
    for i, cell in enumerate(c.strip() for c in raw.split(",")):
        m = _CPU_CORE.match(cell)
        if m:
            freq = float(m.group(2)) * 1e6 if m.group(2) else None
            cores.append(CpuCore(i, True, int(m.group(1)) / 100.0, freq))
        elif cell == "off":
            cores.append(CpuCore(i, False))
    return tuple(cores)


def parse_tegrastats_line(line: str) -> TegrastatsSample:
    """Parse one line of ``tegrastats --interval N`` from JetPack 4, 5 or 6.

    Raises :class:`ParseError` when the line has no ``RAM used/totalMB`` field (every JetPack
    version prints it first, after an optional timestamp).
    """
    ram = _RAM.search(line)
    if not ram:
        raise ParseError(f"not a tegrastats line: {line[:200]!r}")
    swap = _SWAP.search(line)
    cpus = _CPU_LIST.search(line)
    gr3d = _GR3D.search(line)
    emc = _EMC.search(line)

    temps: dict[str, float] = {}
    for name, value in _TEMP.findall(line):
        celsius = float(value)
        if celsius <= _INVALID_TEMPERATURE or (name.lower(), celsius) in _PLACEHOLDER_TEMPERATURES:
            continue
        temps.setdefault(name.lower(), celsius)

    power: dict[str, float] = {}
    average: dict[str, float] = {}
    # the CPU [..] list is not a rail, but "CPU 154/154" on Xavier JetPack 4 is
    for name, now_mw, avg_mw in _RAIL.findall(_CPU_LIST.sub("", line)):
        if name in _NOT_RAILS or name in power:
            continue
        power[name] = int(now_mw) / 1000.0
        average[name] = int(avg_mw) / 1000.0

    return TegrastatsSample(
        ram_used_bytes=int(ram.group(1)) * MIB,
        ram_total_bytes=int(ram.group(2)) * MIB,
        swap_used_bytes=int(swap.group(1)) * MIB if swap else None,
        swap_total_bytes=int(swap.group(2)) * MIB if swap else None,
        cpus=_cpu_cores(cpus.group(1)) if cpus else (),
        gpu_utilization_ratio=int(gr3d.group(1)) / 100.0 if gr3d else None,
        gpu_frequency_hertz=_mhz(gr3d.group(2)) if gr3d else None,
        emc_utilization_ratio=int(emc.group(1)) / 100.0 if emc else None,
        temperatures_celsius=temps,
        power_watts=power,
        power_average_watts=average,
    )


# --- /proc and /sys ---------------------------------------------------------------------------


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """``/proc/loadavg`` -> (load1, load5, load15)."""
    parts = text.split()
    if len(parts) < 3:
        raise ParseError(f"bad /proc/loadavg: {text!r}")
    return float(parts[0]), float(parts[1]), float(parts[2])


def parse_meminfo(text: str) -> dict[str, float]:
    """``/proc/meminfo`` -> field name -> bytes (``kB`` values multiplied by 1024)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * KIB if len(parts) > 1 and parts[1] == "kB" else value
    if "MemTotal" not in out:
        raise ParseError("no MemTotal in /proc/meminfo")
    return out


#: the mode of each column of the ``cpu`` line of /proc/stat, in order
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def parse_proc_stat_cpu(text: str, ticks_per_second: float) -> dict[str, float]:
    """The aggregate ``cpu`` line of ``/proc/stat`` -> mode -> seconds spent, all CPUs together.

    Guest time is already counted in user/nice, so it is left out.
    """
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = parts[1 : 1 + len(CPU_MODES)]
            return {mode: int(v) / ticks_per_second for mode, v in zip(CPU_MODES, values)}
    raise ParseError("no aggregate cpu line in /proc/stat")


def parse_uptime(text: str) -> float:
    """``/proc/uptime`` -> seconds since boot."""
    try:
        return float(text.split()[0])
    except (IndexError, ValueError) as exc:
        raise ParseError(f"bad /proc/uptime: {text!r}") from exc


@dataclass(frozen=True)
class InterfaceCounters:
    """Byte, packet and error counters of one network interface from ``/proc/net/dev``."""

    receive_bytes: int
    receive_packets: int
    receive_errors: int
    transmit_bytes: int
    transmit_packets: int
    transmit_errors: int


def parse_net_dev(text: str) -> dict[str, InterfaceCounters]:
    """``/proc/net/dev`` -> interface -> counters."""
    out: dict[str, InterfaceCounters] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep or "|" in line:
            continue
        cols = rest.split()
        if len(cols) < 16:
            continue
        try:
            v = [int(c) for c in cols[:16]]
        except ValueError:
            continue
        out[name.strip()] = InterfaceCounters(v[0], v[1], v[2], v[8], v[9], v[10])
    return out


def parse_thermal_temp(text: str) -> float:
    """A ``/sys/class/thermal/thermal_zone*/temp`` value (millidegrees) -> celsius."""
    try:
        return int(text.strip()) / 1000.0
    except ValueError as exc:
        raise ParseError(f"bad thermal zone temperature: {text!r}") from exc


def process_matches(name: str, comm: str, cmdline: Sequence[str]) -> bool:
    """Whether a process with this ``comm`` and argv is the process called *name*.

    Matches the kernel's command name (truncated to 15 characters), the base name of
    ``argv[0]``, or the base name of any argument (so ``python3 infer.py`` matches ``infer.py``).
    """
    if comm.strip() == name[:15]:
        return True
    return any(arg.rsplit("/", 1)[-1] == name for arg in cmdline if arg)


def split_cmdline(raw: bytes) -> list[str]:
    """``/proc/<pid>/cmdline`` (NUL separated) -> argv."""
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
