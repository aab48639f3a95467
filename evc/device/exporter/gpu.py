"""GPU collectors of the edge exporter: NVIDIA GPUs (NVML or nvidia-smi) and Jetson tegrastats."""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import threading
import time
from typing import Any, Iterable, Sequence

from prometheus_client.core import Metric

from .collectors import SourceCollector, SourceUnavailable, gauge
from .parsers import (
    NVIDIA_SMI_ARGS,
    GpuSample,
    TegrastatsSample,
    parse_nvidia_smi_csv,
    parse_tegrastats_line,
)

log = logging.getLogger(__name__)


def run_nvidia_smi(binary: str = "nvidia-smi", timeout_s: float = 5.0) -> str:
    """The CSV output of the exporter's nvidia-smi query; raises :class:`SourceUnavailable`."""
    path = shutil.which(binary)
    if path is None:
        raise SourceUnavailable(f"{binary} not found")
    try:
        proc = subprocess.run(
            [path, *NVIDIA_SMI_ARGS],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SourceUnavailable(f"{binary} did not answer within {timeout_s}s") from exc
    except OSError as exc:
        raise SourceUnavailable(f"cannot run {binary}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[:300]
        raise SourceUnavailable(f"{binary} exited with {proc.returncode}: {detail}")
    return proc.stdout


class NvmlReader:
    """Reads GPUs through NVML (the ``pynvml`` module of nvidia-ml-py) when it is installed."""

    def __init__(self) -> None:
        self._nv: Any = None

    @staticmethod
    def importable() -> bool:
        try:
            importlib.import_module("pynvml")
        except ImportError:
            return False
        return True

    def _lib(self) -> Any:
        if self._nv is None:
            try:
                nv = importlib.import_module("pynvml")
                nv.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - ImportError or NVMLError (no driver)
                raise SourceUnavailable(f"NVML unavailable: {exc}") from exc
            self._nv = nv
        return self._nv

    def read(self) -> list[GpuSample]:
        nv = self._lib()

        def get(fn: str, *args: Any) -> Any:
            try:
                return getattr(nv, fn)(*args)
            except nv.NVMLError:
                return None

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value or "")

        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            raise SourceUnavailable(f"NVML: {exc}") from exc
        gpus = []
        for i in range(count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            util = get("nvmlDeviceGetUtilizationRates", h)
            mem = None
            if hasattr(nv, "nvmlMemory_v2"):  # v2 leaves out reserved memory, as nvidia-smi does
                mem = get("nvmlDeviceGetMemoryInfo", h, nv.nvmlMemory_v2)
            mem = mem or get("nvmlDeviceGetMemoryInfo", h)
            temp = get("nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU)
            power_mw = get("nvmlDeviceGetPowerUsage", h)
            gpus.append(
                GpuSample(
                    index=str(i),
                    name=text(get("nvmlDeviceGetName", h)),
                    uuid=text(get("nvmlDeviceGetUUID", h)),
                    utilization_ratio=None if util is None else util.gpu / 100.0,
                    memory_used_bytes=None if mem is None else float(mem.used),
                    memory_total_bytes=None if mem is None else float(mem.total),
                    temperature_celsius=None if temp is None else float(temp),
                    power_watts=None if power_mw is None else power_mw / 1000.0,
                )
            )
        return gpus

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down a library that may be half gone
                pass
            self._nv = None


def gpu_families(gpus: Sequence[GpuSample]) -> list[Metric]:
    """The ``evc_edge_gpu_*`` families for a list of GPUs; unsupported values are left out."""
    info = gauge("gpu_info", "GPU identity; always 1.", ["gpu", "name", "uuid"])
    util = gauge("gpu_utilization_ratio", "Fraction of time the GPU was busy (0..1).", ["gpu"])
    used = gauge("gpu_memory_used_bytes", "GPU memory in use.", ["gpu"])
    total = gauge("gpu_memory_total_bytes", "GPU memory installed.", ["gpu"])
    temp = gauge("gpu_temperature_celsius", "GPU core temperature.", ["gpu"])
    power = gauge("gpu_power_watts", "GPU board power draw.", ["gpu"])
    for g in gpus:
        info.add_metric([g.index, g.name, g.uuid], 1.0)
        for fam, value in (
            (util, g.utilization_ratio),
            (used, g.memory_used_bytes),
            (total, g.memory_total_bytes),
            (temp, g.temperature_celsius),
            (power, g.power_watts),
        ):
            if value is not None:
                fam.add_metric([g.index], value)
    return [info, util, used, total, temp, power]


class NvidiaCollector(SourceCollector):
    """NVIDIA GPUs: through NVML when pynvml is importable and works, otherwise nvidia-smi."""

    collector = "nvidia"

    def __init__(self, nvidia_smi: str = "nvidia-smi", use_nvml: bool = True, timeout_s: float = 5.0) -> None:
        super().__init__()
        self.nvidia_smi = nvidia_smi
        self.timeout_s = timeout_s
        self.nvml: NvmlReader | None = NvmlReader() if use_nvml and NvmlReader.importable() else None
        #: which source the last successful read used: "nvml" or "nvidia-smi"
        self.source = ""

    def sample(self) -> list[GpuSample]:
        if self.nvml is not None:
            try:
                gpus = self.nvml.read()
                self.source = "nvml"
                return gpus
            except Exception as exc:  # noqa: BLE001 - whatever NVML does, nvidia-smi may work
                log.info("NVML failed (%s); using %s", exc, self.nvidia_smi)
                self.nvml.close()
                self.nvml = None
        gpus = parse_nvidia_smi_csv(run_nvidia_smi(self.nvidia_smi, self.timeout_s))
        if not gpus:
            raise SourceUnavailable(f"{self.nvidia_smi} lists no GPU")
        self.source = "nvidia-smi"
        return gpus

    def read(self) -> Iterable[Metric]:
        return gpu_families(self.sample())

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()


class TegrastatsReader:
    """Runs ``tegrastats --interval N`` in the background and keeps its latest line.

    tegrastats prints one line per interval for as long as it runs, so the exporter keeps one
    process and reads its newest line at scrape time. The process is restarted if it exits.
    """

    def __init__(self, binary: str = "tegrastats", interval_ms: int = 2000, restart_delay_s: float = 5.0) -> None:
        self.binary = binary
        self.interval_ms = interval_ms
        self.restart_delay_s = restart_delay_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._line: tuple[str, float] | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start reading; False (and nothing started) when tegrastats is not installed."""
        path = shutil.which(self.binary)
        if path is None:
            return False
        self._thread = threading.Thread(target=self._run, args=(path,), name="tegrastats", daemon=True)
        self._thread.start()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, path: str) -> None:
        delay = self.restart_delay_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [path, "--interval", str(self.interval_ms)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    bufsize=1,
                )
            except OSError as exc:
                log.warning("cannot start %s: %s", path, exc)
            else:
                self._proc = proc
                self._read_lines(proc)
                if not self._stop.is_set():
                    log.warning("%s exited with %s; restarting", path, proc.returncode)
            # back off while tegrastats keeps failing at once (no permission, broken install)
            quick = time.monotonic() - started < 10 * self.restart_delay_s
            delay = min(delay * 2, 60.0) if quick else self.restart_delay_s
            self._stop.wait(delay)

    def _read_lines(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            if self._stop.is_set():  # stop() ran before _proc was set
                return
            for line in proc.stdout:
                if line.strip():
                    with self._lock:
                        self._line = (line.strip(), time.monotonic())
                if self._stop.is_set():
                    break
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.terminate()
            proc.wait()

    def latest(self) -> tuple[str, float] | None:
        """The newest line and its ``time.monotonic()`` arrival, or None before the first."""
        with self._lock:
            return self._line

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(timeout_s)


def tegrastats_families(s: TegrastatsSample) -> list[Metric]:
    """The ``evc_edge_jetson_*`` families of one parsed tegrastats line."""
    fams: list[Metric] = []

    def single(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            f = gauge(name, doc)
            f.add_metric([], value)
            fams.append(f)

    single("jetson_ram_used_bytes", "RAM in use, as tegrastats reports it.", s.ram_used_bytes)
    single("jetson_ram_total_bytes", "RAM size, as tegrastats reports it.", s.ram_total_bytes)
    single("jetson_swap_used_bytes", "Swap in use.", s.swap_used_bytes)
    single("jetson_swap_total_bytes", "Swap size.", s.swap_total_bytes)
    single(
        "jetson_gpu_utilization_ratio",
        "GR3D (integrated GPU) load (0..1).",
        s.gpu_utilization_ratio,
    )
    single("jetson_gpu_frequency_hertz", "GR3D clock.", s.gpu_frequency_hertz)
    single(
        "jetson_emc_utilization_ratio",
        "External memory controller load (0..1).",
        s.emc_utilization_ratio,
    )
    if s.cpus:
        online = gauge("jetson_cpu_online", "Whether the CPU core is online.", ["core"])
        util = gauge("jetson_cpu_utilization_ratio", "CPU core load (0..1).", ["core"])
        freq = gauge("jetson_cpu_frequency_hertz", "CPU core clock.", ["core"])
        for c in s.cpus:
            online.add_metric([str(c.index)], 1.0 if c.online else 0.0)
            if c.utilization_ratio is not None:
                util.add_metric([str(c.index)], c.utilization_ratio)
            if c.frequency_hertz is not None:
                freq.add_metric([str(c.index)], c.frequency_hertz)
        fams += [online, util, freq]
    temp = gauge("jetson_temperature_celsius", "Temperature of an on-module sensor.", ["sensor"])
    for sensor, celsius in sorted(s.temperatures_celsius.items()):
        temp.add_metric([sensor], celsius)
    power = gauge("jetson_power_watts", "Instantaneous power of a rail.", ["rail"])
    average = gauge("jetson_power_average_watts", "Average power of a rail since tegrastats started.", ["rail"])
    for rail, watts in sorted(s.power_watts.items()):
        power.add_metric([rail], watts)
        average.add_metric([rail], s.power_average_watts.get(rail, watts))
    return fams + [temp, power, average]


class TegrastatsCollector(SourceCollector):
    """Jetson module metrics from the newest tegrastats line of a :class:`TegrastatsReader`."""

    collector = "tegrastats"

    def __init__(self, reader: TegrastatsReader | None, max_age_s: float | None = None) -> None:
        super().__init__()
        self.reader = reader
        # a line older than three intervals means tegrastats stalled or died
        self.max_age_s = (
            max_age_s if max_age_s is not None else (3 * (reader.interval_ms / 1000.0) + 1.0 if reader else 0.0)
        )

    def read(self) -> Iterable[Metric]:
        if self.reader is None or not self.reader.running:
            raise SourceUnavailable("tegrastats is not running (not a Jetson, or not installed)")
        latest = self.reader.latest()
        if latest is None:
            raise SourceUnavailable("no tegrastats line yet")
        line, at = latest
        age = time.monotonic() - at
        if age > self.max_age_s:
            raise SourceUnavailable(f"newest tegrastats line is {age:.0f}s old")
        return tegrastats_families(parse_tegrastats_line(line))

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
