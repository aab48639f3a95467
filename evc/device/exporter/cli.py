"""Command line and HTTP server of the edge exporter: ``python -m evc.device.exporter --port 9110``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Sequence

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from . import __version__
from .collectors import (
    DEFAULT_NET_EXCLUDE,
    CpuCollector,
    EdgeExporter,
    FilesystemCollector,
    LoadCollector,
    MemoryCollector,
    NetworkCollector,
    ProcessLivenessCollector,
    SourceCollector,
    ThermalCollector,
    UptimeCollector,
)
from .gpu import NvidiaCollector, TegrastatsCollector, TegrastatsReader

log = logging.getLogger(__name__)

#: every collector name, as ``--disable`` and ``evc_edge_collector_up{collector}`` spell them
COLLECTORS = (
    "loadavg",
    "meminfo",
    "cpu",
    "uptime",
    "filesystem",
    "netdev",
    "thermal",
    "nvidia",
    "tegrastats",
    "process",
)
DEFAULT_PORT = 9110


@dataclass(frozen=True)
class ExporterConfig:
    """What the exporter collects and where it listens."""

    listen: str = "0.0.0.0"  # noqa: S104 - an exporter is meant to be scraped from the network
    port: int = DEFAULT_PORT
    processes: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ("/",)
    nvidia_smi: str = "nvidia-smi"
    nvml: bool = True
    tegrastats: str = "tegrastats"
    tegrastats_interval_ms: int = 2000
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    net_exclude: str = DEFAULT_NET_EXCLUDE
    disabled: tuple[str, ...] = ()


def build_exporter(config: ExporterConfig) -> EdgeExporter:
    """The collectors *config* asks for; starts the tegrastats reader where tegrastats exists."""
    proc, sys_root = Path(config.proc_root), Path(config.sys_root)
    wanted = [c for c in COLLECTORS if c not in config.disabled]
    collectors: list[SourceCollector] = []
    for name in wanted:
        if name == "loadavg":
            collectors.append(LoadCollector(proc))
        elif name == "meminfo":
            collectors.append(MemoryCollector(proc))
        elif name == "cpu":
            collectors.append(CpuCollector(proc))
        elif name == "uptime":
            collectors.append(UptimeCollector(proc))
        elif name == "filesystem":
            collectors.append(FilesystemCollector(config.mounts))
        elif name == "netdev":
            collectors.append(NetworkCollector(proc, config.net_exclude))
        elif name == "thermal":
            collectors.append(ThermalCollector(sys_root))
        elif name == "nvidia":
            collectors.append(NvidiaCollector(config.nvidia_smi, use_nvml=config.nvml))
        elif name == "tegrastats":
            reader = TegrastatsReader(config.tegrastats, config.tegrastats_interval_ms)
            collectors.append(TegrastatsCollector(reader if reader.start() else None))
        elif name == "process" and config.processes:
            collectors.append(ProcessLivenessCollector(config.processes, proc))
    return EdgeExporter(collectors)


def make_registry(exporter: EdgeExporter) -> CollectorRegistry:
    """A registry holding only the exporter (no client-library process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    return registry


class ExporterServer:
    """The exporter's HTTP endpoint (``/metrics``) on a background thread."""

    def __init__(self, exporter: EdgeExporter, listen: str, port: int) -> None:
        self.exporter = exporter
        self.listen = listen
        self.port = port
        self._server: Any = None

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        result = start_http_server(self.port, addr=self.listen, registry=make_registry(self.exporter))
        if isinstance(result, tuple):  # prometheus_client >= 0.17 returns (server, thread)
            self._server = result[0]
            self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.exporter.close()


def parse_args(argv: Sequence[str] | None = None) -> tuple[ExporterConfig, argparse.Namespace]:
    ns = _parser().parse_args(argv)
    return _config(ns), ns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evc-edge-exporter",
        description="EVC edge exporter: GPU, Jetson, thermal, host and process metrics.",
    )
    p.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")  # noqa: S104
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--process",
        action="append",
        default=[],
        metavar="NAME",
        help="report evc_edge_process_up{name=NAME}; repeat for several",
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="PATH",
        help="report disk usage of PATH; repeat for several (default /)",
    )
    _add_source_args(p)
    p.add_argument(
        "--disable",
        action="append",
        default=[],
        choices=COLLECTORS,
        metavar="NAME",
        help=f"turn a collector off; one of {', '.join(COLLECTORS)}",
    )
    p.add_argument("--once", action="store_true", help="print the metrics once and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _add_source_args(p: argparse.ArgumentParser) -> None:
    """Where the collectors read: GPU tools, procfs and sysfs, which interfaces."""
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi command or path")
    p.add_argument("--no-nvml", action="store_true", help="do not use NVML even if pynvml is installed")
    p.add_argument("--tegrastats", default="tegrastats", help="tegrastats command or path")
    p.add_argument(
        "--tegrastats-interval",
        type=int,
        default=2000,
        metavar="MS",
        help="tegrastats --interval in milliseconds (default 2000)",
    )
    p.add_argument("--proc-root", default="/proc", help="procfs root (default /proc)")
    p.add_argument("--sys-root", default="/sys", help="sysfs root (default /sys)")
    p.add_argument(
        "--net-exclude",
        default=DEFAULT_NET_EXCLUDE,
        metavar="REGEX",
        help="interfaces to leave out (default: loopback, container bridges)",
    )


def _config(ns: argparse.Namespace) -> ExporterConfig:
    return ExporterConfig(
        listen=ns.listen,
        port=ns.port,
        processes=tuple(ns.process),
        mounts=tuple(ns.mount) or ("/",),
        nvidia_smi=ns.nvidia_smi,
        nvml=not ns.no_nvml,
        tegrastats=ns.tegrastats,
        tegrastats_interval_ms=ns.tegrastats_interval,
        proc_root=ns.proc_root,
        sys_root=ns.sys_root,
        net_exclude=ns.net_exclude,
        disabled=tuple(ns.disable),
    )


def main(argv: Sequence[str] | None = None) -> int:
    config, ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exporter = build_exporter(config)
    if ns.once:
        try:
            sys.stdout.write(generate_latest(make_registry(exporter)).decode())
        finally:
            exporter.close()
        return 0

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = ExporterServer(exporter, config.listen, config.port)
    try:
        port = server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.listen, config.port, exc)
        exporter.close()
        return 1
    log.info("EVC edge exporter %s listening on %s:%s", __version__, config.listen, port)
    while not stop.wait(3600):
        pass
    log.info("stopping")
    server.stop()
    return 0
