"""The hardware view EVF adapts models to: per member of a cluster, what it is (arch, CPUs,
memory, accelerators, runtimes: from the facts registration probed, :func:`evc.registration.parse_facts`)
and how loaded it is (the latest health record, :mod:`evc.health`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evc.health import cpus_of
from evc.model import JSON
from evc.store import Store

#: the health record's measurements shown as the device's load
LOAD_FIELDS = ("load1", "load5", "load15", "mem_used_ratio", "disk_used_ratio", "temperature_c", "uptime_s")


def device_hardware(dev: Mapping[str, Any]) -> JSON:
    facts = dev.get("facts") or {}
    health = dev.get("health") or {}
    cpus = cpus_of(dev)
    accelerators = [{"kind": "gpu", **g} for g in facts.get("gpus") or []]
    if facts.get("jetson"):
        accelerators.append({"kind": "jetson", "name": str(facts["jetson"])})
    load: JSON | None = None
    if health.get("checked_at"):
        load = {k: health.get(k) for k in LOAD_FIELDS}
        load1 = health.get("load1")
        load["load1_per_cpu"] = round(load1 / cpus, 3) if cpus and isinstance(load1, int | float) else None
        load["checked_at"] = health.get("checked_at")
        load["source"] = health.get("source")
    return {
        "id": dev["id"],
        "name": dev.get("name"),
        "state": dev.get("state"),
        "level": dev.get("level"),
        "arch": facts.get("arch") or None,
        "os": facts.get("os") or None,
        "kernel": facts.get("kernel") or None,
        "cpus": cpus,
        "memory_bytes": facts.get("memory_bytes"),
        "disk_free_bytes": facts.get("disk_free_bytes"),
        "accelerators": accelerators,
        "runtimes": {
            "python3": facts.get("python3"),
            "docker": bool(facts.get("docker")),
            "containerd": bool(facts.get("containerd")),
            "podman": bool(facts.get("podman")),
            "systemd": bool(facts.get("systemd")),
        },
        "privilege": dev.get("privilege") or facts.get("privilege"),
        "load": load,
    }


def cluster_hardware(store: Store, cluster_id: str) -> JSON:
    """The cluster's members' hardware (404 for an unknown cluster)."""
    cl = store.get_cluster(cluster_id)
    devices = store.get_devices(store.cluster_members(cluster_id))
    return {
        "cluster_id": cl["id"],
        "name": cl.get("name"),
        "profile": cl.get("profile"),
        "devices": [device_hardware(d) for d in sorted(devices, key=lambda d: d.get("name") or d["id"])],
    }
