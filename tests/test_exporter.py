"""EVC's edge exporter: parsers on recorded outputs, collectors that degrade, the HTTP endpoint."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from evc.device.exporter.cli import ExporterConfig, ExporterServer, build_exporter, make_registry
from evc.device.exporter.collectors import (
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
from evc.device.exporter.gpu import NvidiaCollector, TegrastatsCollector, TegrastatsReader
from evc.device.exporter.parsers import (
    ParseError,
    parse_loadavg,
    parse_meminfo,
    parse_net_dev,
    parse_nvidia_smi_csv,
    parse_proc_stat_cpu,
    parse_tegrastats_line,
    parse_thermal_temp,
    parse_uptime,
    process_matches,
    split_cmdline,
)
from tests.fixtures.prometheus import (
    DATA,
    EXPORTER_SRC,
    STANDALONE_PACKAGE,
    EdgeExporterProcess,
    edge_exporter,  # noqa: F401 - a fixture
    fake_nvidia_smi,
    fake_sys_root,
    fake_tegrastats,
    free_port,
    standalone_exporter,
    wait_until,
    write_script,
)

MIB = 1024 * 1024
T4_UUID = "GPU-8d9b2f6a-3c4e-5f61-7a82-9b3c4d5e6f70"


def samples(collector: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of everything *collector* yields."""
    out = {}
    for fam in collector.collect():  # type: ignore[attr-defined]
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(source: object, metric: str, /, **labels: str) -> float | None:
    return samples(source).get((metric, tuple(sorted(labels.items()))))


def names(collector: object) -> set[str]:
    return {name for name, _ in samples(collector)}


# --- nvidia-smi ---------------------------------------------------------------------------------


def test_nvidia_smi_two_gpus_one_without_power() -> None:
    gpus = parse_nvidia_smi_csv((DATA / "nvidia-smi-2gpu.csv").read_text())
    assert [g.index for g in gpus] == ["0", "1"]
    t4, gtx = gpus
    assert t4.name == "Tesla T4"
    assert t4.uuid == "GPU-8d9b2f6a-3c4e-5f61-7a82-9b3c4d5e6f70"
    assert t4.utilization_ratio == pytest.approx(0.37)
    assert t4.memory_used_bytes == 2345 * MIB
    assert t4.memory_total_bytes == 15360 * MIB
    assert t4.temperature_celsius == 52
    assert t4.power_watts == pytest.approx(31.47)
    assert gtx.name == "NVIDIA GeForce GTX 1650"
    assert gtx.power_watts is None  # "[N/A]"
    assert gtx.utilization_ratio == 0.0


def test_nvidia_smi_odd_rows() -> None:
    assert parse_nvidia_smi_csv("") == []
    text = "0, Acme, Inc. GPU, GPU-1, [Not Supported], 10, 100, N/A, 5.5\nno devices\n"
    (g,) = parse_nvidia_smi_csv(text)
    assert g.name == "Acme, Inc. GPU" and g.uuid == "GPU-1"
    assert g.utilization_ratio is None and g.temperature_celsius is None and g.power_watts == 5.5
    with pytest.raises(ParseError):
        parse_nvidia_smi_csv("No devices were found\n")


# --- tegrastats -------------------------------------------------------------------------------

# file -> (RAM used MiB, cores, cores off, GR3D ratio, GR3D Hz, EMC ratio, temps, rails (W))
TEGRASTATS = {
    "tegrastats-jp4-nano.txt": (
        1681, 4, 0, 0.23, 921e6, 0.06,
        {"cpu": 39.0, "gpu": 37.0, "ao": 44.5, "pll": 36.5, "thermal": 38.0},
        {"POM_5V_IN": (2.996, 2.910), "POM_5V_GPU": (0.404, 0.370), "POM_5V_CPU": (0.726, 0.690)},
    ),
    "tegrastats-jp4-xavier-nx.txt": (
        2918, 6, 2, 0.0, None, 0.0,
        {"cpu": 39.5, "gpu": 38.0, "ao": 38.0, "aux": 37.5, "thermal": 38.25},
        {"VDD_IN": (4.882, 4.882), "VDD_CPU_GPU_CV": (0.571, 0.571), "VDD_SOC": (1.387, 1.387)},
    ),
    "tegrastats-jp4-xavier-agx.txt": (
        2118, 8, 4, 0.0, None, 0.0,
        {"cpu": 38.5, "gpu": 38.0, "tdiode": 40.25, "tboard": 38.0},
        {"GPU": (0.0, 0.0), "CPU": (0.154, 0.154), "SOC": (1.080, 1.080), "SYS5V": (1.541, 1.541)},
    ),
    "tegrastats-jp5-orin-agx.txt": (
        5214, 12, 4, 0.47, 816e6, 0.01,
        {"cpu": 46.062, "gpu": 44.531, "tj": 46.062, "soc0": 42.968, "tboard": 36.0},
        {"VDD_GPU_SOC": (5.193, 5.102), "VDD_CPU_CV": (1.196, 1.156),
         "VIN_SYS_5V0": (4.432, 4.412)},
    ),
    "tegrastats-jp6-orin-nano.txt": (
        2105, 6, 0, 0.12, None, None,
        {"cpu": 47.156, "gpu": 45.062, "tj": 47.156, "soc2": 45.968},
        {"VDD_IN": (4.861, 4.861), "VDD_CPU_GPU_CV": (0.515, 0.515), "VDD_SOC": (1.428, 1.428)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEGRASTATS))
def test_tegrastats_formats(name: str) -> None:
    ram, ncores, noff, gr3d, gr3d_hz, emc, temps, rails = TEGRASTATS[name]
    line = (DATA / name).read_text().splitlines()[-1]
    s = parse_tegrastats_line(line)
    assert s.ram_used_bytes == ram * MIB
    assert s.ram_total_bytes is not None and s.ram_total_bytes > s.ram_used_bytes
    assert s.swap_used_bytes == 0 and s.swap_total_bytes
    assert len(s.cpus) == ncores
    assert sum(not c.online for c in s.cpus) == noff
    assert all(c.utilization_ratio is not None for c in s.cpus if c.online)
    assert all(0 <= (c.utilization_ratio or 0) <= 1 for c in s.cpus)
    assert s.gpu_utilization_ratio == pytest.approx(gr3d)
    assert s.gpu_frequency_hertz == gr3d_hz
    assert s.emc_utilization_ratio == (pytest.approx(emc) if emc is not None else None)
    for sensor, celsius in temps.items():
        assert s.temperatures_celsius[sensor] == pytest.approx(celsius)
    # powered-down sensors (-256C) and the JetPack 4 PMIC@100C placeholder are left out
    assert all(-40 < c < 100 for c in s.temperatures_celsius.values())
    for rail, (now, avg) in rails.items():
        assert s.power_watts[rail] == pytest.approx(now)
        assert s.power_average_watts[rail] == pytest.approx(avg)
    assert not {"RAM", "SWAP", "IRAM", "NC"} & set(s.power_watts)


def test_tegrastats_cpu_cores() -> None:
    s = parse_tegrastats_line((DATA / "tegrastats-jp5-orin-agx.txt").read_text().splitlines()[-1])
    first, fifth, last = s.cpus[0], s.cpus[4], s.cpus[-1]
    assert (first.index, first.utilization_ratio, first.frequency_hertz) == (0, 0.04, 1113e6)
    assert (fifth.utilization_ratio, fifth.frequency_hertz) == (0.11, 1420e6)
    assert (last.index, last.online, last.utilization_ratio) == (11, False, None)


def test_tegrastats_rejects_other_text() -> None:
    with pytest.raises(ParseError):
        parse_tegrastats_line("tegrastats: command not found")


# --- /proc and /sys ---------------------------------------------------------------------------


def test_proc_parsers() -> None:
    mem = parse_meminfo((DATA / "proc-meminfo.txt").read_text())
    assert mem["MemTotal"] == 3964260 * 1024
    assert mem["MemAvailable"] == 2103968 * 1024
    assert mem["HugePages_Total"] == 0
    with pytest.raises(ParseError):
        parse_meminfo("garbage")

    net = parse_net_dev((DATA / "proc-net-dev.txt").read_text())
    assert set(net) == {"lo", "eth0", "wlan0"}
    assert (net["eth0"].receive_bytes, net["eth0"].transmit_bytes) == (812734512, 51234871)
    assert (net["eth0"].receive_packets, net["eth0"].transmit_packets) == (923411, 402113)

    assert parse_loadavg("0.52 0.58 0.59 2/1043 12345\n") == (0.52, 0.58, 0.59)
    assert parse_uptime("350735.47 234388.90\n") == 350735.47
    stat = parse_proc_stat_cpu("cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 2 3 4\n", 100.0)
    assert stat == {
        "user": 1.0, "nice": 0.05, "system": 0.5, "idle": 10.0,
        "iowait": 0.2, "irq": 0.01, "softirq": 0.02, "steal": 0.03,
    }  # fmt: skip
    assert parse_thermal_temp("45500\n") == 45.5
    with pytest.raises(ParseError):
        parse_uptime("")
    with pytest.raises(ParseError):
        parse_thermal_temp("")


def test_process_matching() -> None:
    argv = split_cmdline(b"/usr/bin/python3\x00/opt/app/infer.py\x00--camera\x000\x00")
    assert argv == ["/usr/bin/python3", "/opt/app/infer.py", "--camera", "0"]
    assert process_matches("infer.py", "python3", argv)
    assert process_matches("python3", "python3", argv)
    assert process_matches("gst-launch-1.0-camera", "gst-launch-1.0-", [])  # comm is 15 chars
    assert not process_matches("infer", "python3", argv)
    assert not process_matches("camera", "python3", argv)


# --- collectors -------------------------------------------------------------------------------


def test_host_collectors_read_this_machine() -> None:
    for collector in (
        LoadCollector(),
        MemoryCollector(),
        CpuCollector(),
        UptimeCollector(),
        NetworkCollector(),
    ):
        assert value(collector, "evc_edge_collector_up", collector=collector.collector) == 1.0
    assert value(MemoryCollector(), "evc_edge_memory_total_bytes") > 0  # type: ignore[operator]
    assert value(CpuCollector(), "evc_edge_cpus") == os.cpu_count()
    assert value(CpuCollector(), "evc_edge_cpu_seconds_total", mode="idle") > 0  # type: ignore[operator]
    assert value(UptimeCollector(), "evc_edge_uptime_seconds") > 0  # type: ignore[operator]
    net = NetworkCollector(exclude="")
    assert value(net, "evc_edge_network_receive_bytes_total", interface="lo") is not None
    assert value(NetworkCollector(), "evc_edge_network_receive_bytes_total", interface="lo") is None


def test_collectors_degrade_without_their_source(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    for collector in (
        LoadCollector(missing),
        MemoryCollector(missing),
        CpuCollector(missing),
        UptimeCollector(missing),
        NetworkCollector(missing),
        ThermalCollector(missing),
        ProcessLivenessCollector(["x"], missing),
        FilesystemCollector([str(missing)]),
        NvidiaCollector(str(missing / "nvidia-smi")),
        NvidiaCollector(),  # no nvidia-smi on this machine's PATH
        TegrastatsCollector(None),
    ):
        got = samples(collector)  # must not raise
        up = {k: v for k, v in got.items() if k[0] == "evc_edge_collector_up"}
        assert up == {("evc_edge_collector_up", (("collector", collector.collector),)): 0.0}
        own = {k[0] for k in got} - {"evc_edge_collector_up", "evc_edge_collector_duration_seconds"}
        assert own <= {"evc_edge_filesystem_error"}, own


def test_collector_survives_a_bug() -> None:
    class Broken(SourceCollector):
        collector = "broken"

        def read(self) -> list[Metric]:
            raise ZeroDivisionError("bug")

    assert value(Broken(), "evc_edge_collector_up", collector="broken") == 0.0


def test_nvidia_collector_with_recorded_output(tmp_path: Path) -> None:
    c = NvidiaCollector(str(fake_nvidia_smi(tmp_path)), use_nvml=False)
    assert value(c, "evc_edge_collector_up", collector="nvidia") == 1.0
    assert (
        value(
            c,
            "evc_edge_gpu_info",
            gpu="0",
            name="Tesla T4",
            uuid="GPU-8d9b2f6a-3c4e-5f61-7a82-9b3c4d5e6f70",
        )
        == 1
    )
    assert value(c, "evc_edge_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    assert value(c, "evc_edge_gpu_memory_used_bytes", gpu="1") == 5 * MIB
    assert value(c, "evc_edge_gpu_memory_total_bytes", gpu="1") == 4096 * MIB
    assert value(c, "evc_edge_gpu_temperature_celsius", gpu="1") == 41
    assert value(c, "evc_edge_gpu_power_watts", gpu="0") == pytest.approx(31.47)
    assert value(c, "evc_edge_gpu_power_watts", gpu="1") is None  # [N/A]: no sample, not 0
    assert c.source == "nvidia-smi"


def test_nvidia_collector_failing_tool(tmp_path: Path) -> None:
    failing = write_script(tmp_path / "nvidia-smi", "import sys\nprint('No devices were found')\nsys.exit(6)\n")
    assert (
        value(
            NvidiaCollector(str(failing), use_nvml=False),
            "evc_edge_collector_up",
            collector="nvidia",
        )
        == 0
    )
    hanging = write_script(tmp_path / "hang", "import time\ntime.sleep(30)\n")
    c = NvidiaCollector(str(hanging), use_nvml=False, timeout_s=0.5)
    start = time.monotonic()
    assert value(c, "evc_edge_collector_up", collector="nvidia") == 0
    assert time.monotonic() - start < 5


def fake_pynvml(fail_init: bool = False) -> types.ModuleType:
    """Just enough of nvidia-ml-py's pynvml for two GPUs, the second without power readings."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def not_supported(*_: object) -> None:
        raise NVMLError("Not Supported")

    def init() -> None:
        if fail_init:
            raise NVMLError("Driver Not Loaded")

    gpus = [
        (b"Tesla T4", "GPU-a", 37, 2345 * MIB, 15360 * MIB, 52, 31470),
        ("NVIDIA GeForce GTX 1650", "GPU-b", 0, 5 * MIB, 4096 * MIB, 41, None),
    ]
    nv.NVMLError = NVMLError  # type: ignore[attr-defined]
    nv.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    nv.nvmlMemory_v2 = 2  # type: ignore[attr-defined]
    nv.nvmlInit = init  # type: ignore[attr-defined]
    nv.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nv.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetName = lambda h: h[0]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetUUID = lambda h: h[1]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h[2], memory=0)  # type: ignore[attr-defined]
    nv.nvmlDeviceGetMemoryInfo = lambda h, version=None: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=h[3], total=h[4], free=h[4] - h[3]
    )
    nv.nvmlDeviceGetTemperature = lambda h, sensor: h[5]  # type: ignore[attr-defined]
    nv.nvmlDeviceGetPowerUsage = lambda h: h[6] if h[6] is not None else not_supported()  # type: ignore[attr-defined]
    return nv


def test_nvidia_collector_through_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    c = NvidiaCollector(str(tmp_path / "no-nvidia-smi"))
    assert value(c, "evc_edge_collector_up", collector="nvidia") == 1.0
    assert c.source == "nvml"
    assert value(c, "evc_edge_gpu_info", gpu="0", name="Tesla T4", uuid="GPU-a") == 1.0
    assert value(c, "evc_edge_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    assert value(c, "evc_edge_gpu_memory_used_bytes", gpu="0") == 2345 * MIB
    assert value(c, "evc_edge_gpu_power_watts", gpu="0") == pytest.approx(31.47)
    assert value(c, "evc_edge_gpu_power_watts", gpu="1") is None
    c.close()

    # NVML present but no driver: the collector falls back to nvidia-smi
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fail_init=True))
    c = NvidiaCollector(str(fake_nvidia_smi(tmp_path)))
    assert value(c, "evc_edge_gpu_info", gpu="0", name="Tesla T4", uuid=T4_UUID) == 1.0
    assert c.source == "nvidia-smi" and c.nvml is None


def test_tegrastats_reader_and_collector(tmp_path: Path) -> None:
    reader = TegrastatsReader(str(fake_tegrastats(tmp_path)), interval_ms=50)
    assert reader.start()
    try:
        wait_until(reader.latest, 10, "a tegrastats line")
        c = TegrastatsCollector(reader)
        assert value(c, "evc_edge_collector_up", collector="tegrastats") == 1.0
        assert value(c, "evc_edge_jetson_ram_used_bytes") in (5209 * MIB, 5214 * MIB)
        assert value(c, "evc_edge_jetson_cpu_online", core="11") == 0.0
        assert value(c, "evc_edge_jetson_temperature_celsius", sensor="tj") is not None
        assert value(c, "evc_edge_jetson_power_watts", rail="VDD_GPU_SOC") is not None
        assert value(c, "evc_edge_jetson_gpu_frequency_hertz") == 816e6
    finally:
        reader.stop()
    assert not reader.running
    assert reader._proc is not None and reader._proc.poll() is not None  # tegrastats was stopped
    # a reader that no longer gets lines goes stale
    stale = TegrastatsCollector(reader, max_age_s=0.0)
    assert value(stale, "evc_edge_collector_up", collector="tegrastats") == 0.0
    assert not TegrastatsReader(str(tmp_path / "missing")).start()


def test_thermal_zones(tmp_path: Path) -> None:
    root = fake_sys_root(tmp_path / "sys")
    broken = root / "class" / "thermal" / "thermal_zone2"
    broken.mkdir()
    (broken / "type").write_text("BCPU-therm\n")
    (broken / "temp").write_text("")  # a zone that refuses reads
    c = ThermalCollector(root)
    got = samples(c)
    temps = {dict(k[1])["type"]: v for k, v in got.items() if k[0] == "evc_edge_thermal_zone_temperature_celsius"}
    assert temps == {"CPU-therm": 45.5, "GPU-therm": 43.0}
    assert value(c, "evc_edge_collector_up", collector="thermal") == 1.0


def test_filesystem_and_processes(tmp_path: Path) -> None:
    fs = FilesystemCollector(["/", str(tmp_path / "gone")])
    assert value(fs, "evc_edge_collector_up", collector="filesystem") == 1.0
    assert value(fs, "evc_edge_filesystem_size_bytes", mountpoint="/") > 0  # type: ignore[operator]
    assert value(fs, "evc_edge_filesystem_error", mountpoint="/") == 0.0
    assert value(fs, "evc_edge_filesystem_error", mountpoint=str(tmp_path / "gone")) == 1.0

    sleeper = subprocess.Popen(["sleep", "60"])
    comm = Path(f"/proc/{sleeper.pid}/comm")
    for _ in range(200):  # between fork and exec the child is still called python
        if comm.read_text().strip() == "sleep":
            break
        time.sleep(0.01)
    try:
        c = ProcessLivenessCollector(["sleep", "no-such-process-xyz"])
        assert value(c, "evc_edge_process_up", name="sleep") == 1.0
        assert value(c, "evc_edge_processes", name="sleep") >= 1  # type: ignore[operator]
        assert value(c, "evc_edge_process_up", name="no-such-process-xyz") == 0.0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_exposition_has_one_block_per_metric(tmp_path: Path) -> None:
    config = ExporterConfig(
        nvidia_smi=str(fake_nvidia_smi(tmp_path)),
        nvml=False,
        tegrastats=str(tmp_path / "none"),
        sys_root=str(fake_sys_root(tmp_path / "sys")),
        processes=("sleep",),
    )
    exporter = build_exporter(config)
    try:
        text = generate_latest(make_registry(exporter)).decode()
    finally:
        exporter.close()
    fams = list(text_string_to_metric_families(text))
    family_names = [f.name for f in fams]
    assert len(family_names) == len(set(family_names))
    ups = {s.labels["collector"]: s.value for f in fams for s in f.samples if s.name == "evc_edge_collector_up"}
    assert ups == {
        "loadavg": 1, "meminfo": 1, "cpu": 1, "uptime": 1, "filesystem": 1, "netdev": 1,
        "thermal": 1, "nvidia": 1, "tegrastats": 0, "process": 1,
    }  # fmt: skip
    assert 'evc_edge_exporter_build_info{version="0.1.0"} 1.0' in text
    assert isinstance(exporter, EdgeExporter)


# --- HTTP endpoint and the standalone package ---------------------------------------------------


def test_http_endpoint_in_process(tmp_path: Path) -> None:
    config = ExporterConfig(nvidia_smi=str(fake_nvidia_smi(tmp_path)), nvml=False, tegrastats="no-tegrastats")
    server = ExporterServer(build_exporter(config), "127.0.0.1", 0)
    port = server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
    finally:
        server.stop()
    assert 'evc_edge_gpu_utilization_ratio{gpu="0"} 0.37' in body
    assert 'evc_edge_collector_up{collector="tegrastats"} 0.0' in body
    assert "evc_edge_load1 " in body


def test_cli_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "evc.device.exporter", "--listen", "127.0.0.1", "--port", str(port),
         "--process", "pytest", "--mount", "/", "--mount", str(tmp_path), "--no-nvml",
         "--nvidia-smi", str(tmp_path / "none")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:  # noqa: S310
                    return str(r.read().decode())
            except OSError:
                return ""

        body = wait_until(scrape, 20, "the exporter to listen")
        assert f'evc_edge_filesystem_size_bytes{{mountpoint="{tmp_path}"}}' in body
        assert 'evc_edge_process_up{name="pytest"}' in body
        assert 'evc_edge_collector_up{collector="nvidia"} 0.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out.decode()


def test_standalone_package_needs_only_prometheus_client(tmp_path: Path) -> None:
    """The directory works copied alone under another name, importing nothing of EVC."""
    run_dir = standalone_exporter(tmp_path)
    check = (
        "import sys, runpy\n"
        f"import {STANDALONE_PACKAGE}.cli, {STANDALONE_PACKAGE}.gpu\n"
        "bad = sorted(m for m in sys.modules if m == 'evc' or m.startswith('evc.'))\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", check], cwd=run_dir, env=env, check=True)
    out = subprocess.run(
        [sys.executable, "-m", STANDALONE_PACKAGE, "--once", "--disable", "tegrastats",
         "--no-nvml"],
        cwd=run_dir, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "evc_edge_memory_total_bytes" in out.stdout


def test_exporter_source_is_python38_compatible() -> None:
    """Devices run older Pythons (JetPack 5: 3.8); the syntax must parse there."""
    for path in sorted(EXPORTER_SRC.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "evc", f"{path.name} imports {node.module}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "zip":
                assert not node.keywords, f"{path.name}: zip(strict=) needs Python 3.10"
        text = path.read_text()
        assert "from __future__ import annotations" in text or path.name in {
            "__init__.py",
            "__main__.py",
        }
        for newer in ("removeprefix(", "removesuffix(", "functools.cache(", "match "):
            assert newer not in text, f"{path.name} uses {newer!r}, newer than Python 3.8"


def test_gpu_check_script(tmp_path: Path) -> None:
    """deploy/device-checks/gpu_check.py compares the collector with nvidia-smi."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "device-checks" / "gpu_check.py"
    ok = subprocess.run(
        [sys.executable, str(script), "--nvidia-smi", str(fake_nvidia_smi(tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("PASS") >= 12 and "FAIL" not in ok.stdout

    # an nvidia-smi that reads 50 degrees hotter at the exporter's call only: they disagree
    counter = tmp_path / "calls"
    drifting = write_script(
        tmp_path / "drifting-smi",
        "import pathlib\n"
        f"c = pathlib.Path({str(counter)!r})\n"
        "n = int(c.read_text()) if c.exists() else 0\n"
        "c.write_text(str(n + 1))\n"
        "print('0, Tesla T4, GPU-0, 10, 100, 15360, {}, 30.0'.format(40 + 50 * (n % 2)))\n",
    )
    bad = subprocess.run([sys.executable, str(script), "--nvidia-smi", str(drifting)], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout
    assert "FAIL" in bad.stdout

    missing = subprocess.run(
        [sys.executable, str(script), "--nvidia-smi", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "SKIP" in missing.stdout


def test_exporter_process_fixture(edge_exporter: Callable[..., EdgeExporterProcess]) -> None:  # noqa: F811
    """The fixture other tests scrape: the standalone copy, with every source present."""
    exp = edge_exporter("--process", "sleep")
    body = exp.metrics()
    for collector in ("nvidia", "tegrastats", "thermal", "process"):
        assert f'evc_edge_collector_up{{collector="{collector}"}} 1.0' in body
    assert exp.stop() == 0
