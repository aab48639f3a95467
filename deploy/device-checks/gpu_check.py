#!/usr/bin/env python3
"""Check the edge exporter's NVIDIA collector against nvidia-smi on a real GPU machine.

Run from the repository root with only prometheus_client installed::

    pip install prometheus-client
    python deploy/device-checks/gpu_check.py

It queries nvidia-smi itself, runs the exporter's collector once (through nvidia-smi, and
through NVML too when pynvml is importable), queries nvidia-smi again, and prints the values
side by side. A value passes when it is within tolerance of either nvidia-smi reading.
Exit status: 0 all PASS, 1 some FAIL, 2 nothing to compare (no nvidia-smi or no GPU).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXPORTER_DIR = REPO / "evc" / "device" / "exporter"
FIELDS = "index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"
MIB = 1024 * 1024

# field -> (label, exporter metric, factor from exporter units to nvidia-smi units)
COMPARED = {
    "utilization.gpu": ("utilization %", "evc_edge_gpu_utilization_ratio", 100.0),
    "memory.used": ("memory used MiB", "evc_edge_gpu_memory_used_bytes", 1.0 / MIB),
    "memory.total": ("memory total MiB", "evc_edge_gpu_memory_total_bytes", 1.0 / MIB),
    "temperature.gpu": ("temperature °C", "evc_edge_gpu_temperature_celsius", 1.0),
    "power.draw": ("power W", "evc_edge_gpu_power_watts", 1.0),
}


def tolerance(field: str, reference: dict[str, float | None]) -> float:
    """How far the exporter may be from nvidia-smi for *field* (readings move between calls)."""
    total = reference.get("memory.total") or 0.0
    if field == "utilization.gpu":
        return 10.0
    if field == "memory.used":
        return max(64.0, 0.02 * total)
    if field == "memory.total":
        return max(1.0, 0.01 * total)
    if field == "temperature.gpu":
        return 3.0
    power = reference.get("power.draw") or 0.0
    return max(10.0, 0.10 * power)


def load_exporter() -> ModuleType:
    """Import evc/device/exporter as a standalone package (as a device has it), not through evc."""
    name = "evc_edge_exporter"
    spec = importlib.util.spec_from_file_location(
        name, EXPORTER_DIR / "__init__.py", submodule_search_locations=[str(EXPORTER_DIR)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the exporter from {EXPORTER_DIR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    importlib.import_module(f"{name}.gpu")
    return module


def number(cell: str) -> float | None:
    cell = cell.strip()
    try:
        return float(cell)
    except ValueError:
        return None  # [N/A], [Not Supported]


def query_nvidia_smi(binary: str) -> dict[str, dict[str, Any]]:
    """GPU index -> raw nvidia-smi values, parsed here independently of the exporter."""
    proc = subprocess.run(
        [binary, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nvidia-smi exited {proc.returncode}: {proc.stderr.strip()}")
    gpus: dict[str, dict[str, Any]] = {}
    for row in csv.reader(io.StringIO(proc.stdout), skipinitialspace=True):
        if len(row) < 8:
            continue
        index, name, uuid = row[0].strip(), ", ".join(row[1:-6]).strip(), row[-6].strip()
        values: dict[str, Any] = {"name": name, "uuid": uuid}
        for field, cell in zip(FIELDS.split(",")[3:], row[-5:]):  # noqa: B905 - 3.8 compatible
            values[field] = number(cell)
        gpus[index] = values
    return gpus


def collect_once(exporter: ModuleType, binary: str, use_nvml: bool) -> tuple[str, dict[str, Any]]:
    """Run the exporter's NvidiaCollector once: (source used, GPU index -> values, plus up)."""
    collector = exporter.gpu.NvidiaCollector(binary, use_nvml=use_nvml)
    try:
        families = list(collector.collect())
    finally:
        collector.close()
    gpus: dict[str, Any] = {}
    up = None
    for fam in families:
        for s in fam.samples:
            if s.name == "evc_edge_collector_up":
                up = s.value
            elif s.name == "evc_edge_gpu_info":
                gpus.setdefault(s.labels["gpu"], {}).update(name=s.labels["name"], uuid=s.labels["uuid"])
            else:
                for field, (_, metric, factor) in COMPARED.items():
                    if s.name == metric:
                        gpus.setdefault(s.labels["gpu"], {})[field] = s.value * factor
    return collector.source or "none", {"up": up, "gpus": gpus}


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def row(label: str, a: str = "", b: str = "", v: str = "", tol: str = "", result: str = "") -> str:
    return f"  {label:<18}{a:>12}{b:>10}{v:>10}{tol:>11}  {result}"


def compare(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    got: dict[str, Any],
    source: str,
) -> bool:
    ok = True
    print(f"\n== exporter source: {source}; evc_edge_collector_up = {fmt(got['up'])}")
    if got["up"] != 1.0:
        print("FAIL  the collector reported its source as unavailable")
        return False
    if set(got["gpus"]) != set(before):
        print(f"FAIL  GPUs differ: nvidia-smi {sorted(before)}, exporter {sorted(got['gpus'])}")
        return False
    for index in sorted(before, key=int):
        ref, ref2, mine = before[index], after.get(index, before[index]), got["gpus"][index]
        print(f"\nGPU {index}  {ref['name']}  {ref['uuid']}")
        print(row("field", "nvidia-smi", "(again)", "exporter", "tolerance", "result"))
        ident_ok = mine.get("uuid") == ref["uuid"] and mine.get("name") == ref["name"]
        print(row("identity", result="PASS" if ident_ok else "FAIL"))
        ok &= ident_ok
        for field, (label, _, _) in COMPARED.items():
            a, b, v = ref.get(field), ref2.get(field), mine.get(field)
            tol = tolerance(field, ref)
            if a is None and b is None:
                result = "PASS" if v is None else "FAIL"  # exporter must leave out what is N/A
            elif v is None:
                result = "FAIL"
            else:
                refs = [x for x in (a, b) if x is not None]
                low, high = min(refs) - tol, max(refs) + tol
                result = "PASS" if low <= v <= high else "FAIL"
            ok &= result == "PASS"
            print(row(label, fmt(a), fmt(b), fmt(v), "±" + fmt(tol), result))
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi command or path")
    ns = p.parse_args(argv)
    binary = shutil.which(ns.nvidia_smi)
    if binary is None:
        print(f"SKIP: {ns.nvidia_smi} not found; run this on a machine with an NVIDIA driver")
        return 2
    exporter = load_exporter()
    print(f"EVC edge exporter {exporter.__version__} from {EXPORTER_DIR}; nvidia-smi {binary}")
    try:
        before = query_nvidia_smi(binary)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"SKIP: {exc}")
        return 2
    if not before:
        print("SKIP: nvidia-smi lists no GPU")
        return 2

    runs = [collect_once(exporter, binary, use_nvml=False)]
    if exporter.gpu.NvmlReader.importable():
        runs.append(collect_once(exporter, binary, use_nvml=True))
    else:
        print("NVML: pynvml is not importable; only the nvidia-smi path is checked")
    after = query_nvidia_smi(binary)

    ok = True
    for source, got in runs:
        ok &= compare(before, after, got, source)
    print(f"\n{'PASS' if ok else 'FAIL'}: exporter and nvidia-smi {'agree' if ok else 'disagree'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
