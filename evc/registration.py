"""Device registration: connect with EVC's key, pin the host key, probe facts and privilege."""

from __future__ import annotations

import re
from typing import Any

from evc import ssh
from evc.errors import DeviceError, HostKeyMismatch
from evc.jobs import JobRun
from evc.settings import Settings
from evc.store import JSON, Store, now

#: One POSIX sh script, run once over one channel: a ``key=value`` line per fact.
PROBE = r"""
echo "uid=$(id -u)"
echo "user=$(id -un)"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
echo "hostname=$(uname -n)"
if [ -r /etc/os-release ]; then (. /etc/os-release; echo "os=${PRETTY_NAME:-$NAME}"); fi
echo "cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null)"
awk '/^MemTotal:/{print "mem_kb=" $2}' /proc/meminfo 2>/dev/null
df -Pk "$HOME" 2>/dev/null | awk 'NR==2{print "disk_kb=" $2; print "disk_free_kb=" $4}'
if command -v python3 >/dev/null 2>&1; then
  echo "python3=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)"
fi
command -v docker >/dev/null 2>&1 && echo "docker=1"
command -v containerd >/dev/null 2>&1 && echo "containerd=1"
command -v systemctl >/dev/null 2>&1 && echo "systemd=1"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null | sed 's/^/gpu=/'
fi
command -v tegrastats >/dev/null 2>&1 && echo "tegrastats=1"
[ -r /etc/nv_tegra_release ] && echo "jetson=$(head -n 1 /etc/nv_tegra_release)"
if [ "$(id -u)" = 0 ]; then echo "privilege=root"
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo "privilege=sudo"
else echo "privilege=user"; fi
"""

#: What each privilege level lets EVC do on a device (the seed: exactly the account's rights).
CAPABILITIES: dict[str, list[str]] = {
    "root": [
        "run commands as root",
        "install and update OS packages",
        "install system services (systemd units)",
        "install a container runtime (docker/containerd)",
        "join k3s/k8s clusters",
        "user-space installs (virtual environments, ~/.local)",
    ],
    "sudo": [
        "run commands as root through passwordless sudo",
        "install and update OS packages",
        "install system services (systemd units)",
        "install a container runtime (docker/containerd)",
        "join k3s/k8s clusters",
        "user-space installs (virtual environments, ~/.local)",
    ],
    "user": [
        "user-space installs only (virtual environments, ~/.local, workspace in $HOME)",
        "user-level services or supervised background processes",
        "cannot install OS packages, system services, a container runtime or k3s/k8s",
    ],
}

PRIVILEGE_RANK = {"user": 0, "sudo": 1, "root": 2}

_NUM = re.compile(r"^\d+$")


def parse_facts(text: str) -> JSON:
    """Turn the probe's ``key=value`` lines into the device's facts (pure; unit-tested)."""
    raw: dict[str, Any] = {}
    gpus: list[JSON] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "gpu":
            name, _, mem = value.rpartition(",")
            mem = mem.strip()
            gpus.append({"name": name.strip() or value, "memory_mb": int(mem) if _NUM.match(mem) else None})
        else:
            raw[key] = value
    facts: JSON = {
        "arch": raw.get("arch", ""),
        "os": raw.get("os", ""),
        "kernel": raw.get("kernel", ""),
        "hostname": raw.get("hostname", ""),
        "user": raw.get("user", ""),
        "uid": int(raw["uid"]) if _NUM.match(raw.get("uid", "")) else None,
        "cpus": int(raw["cpus"]) if _NUM.match(raw.get("cpus", "")) else None,
        "memory_bytes": int(raw["mem_kb"]) * 1024 if _NUM.match(raw.get("mem_kb", "")) else None,
        "disk_bytes": int(raw["disk_kb"]) * 1024 if _NUM.match(raw.get("disk_kb", "")) else None,
        "disk_free_bytes": int(raw["disk_free_kb"]) * 1024 if _NUM.match(raw.get("disk_free_kb", "")) else None,
        "python3": raw.get("python3") or None,
        "docker": raw.get("docker") == "1",
        "containerd": raw.get("containerd") == "1",
        "systemd": raw.get("systemd") == "1",
        "gpus": gpus,
        "jetson": raw.get("jetson") or ("tegrastats" if raw.get("tegrastats") == "1" else None),
    }
    priv = raw.get("privilege", "user")
    facts["privilege"] = priv if priv in PRIVILEGE_RANK else "user"
    return facts


async def probe(target: ssh.Target, settings: Settings) -> tuple[JSON, str]:
    """Connect, run the probe, return (facts, the server's host key line)."""
    async with ssh.session(target, settings) as conn:
        host_key = conn.get_server_host_key()
        res = await ssh.run(conn, "sh -s", target, settings, input=PROBE)
    facts = parse_facts(str(res.stdout or ""))
    return facts, ssh.key_line(host_key) if host_key else ""


async def register(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The registration job: the device ends ``online`` with pinned key, facts and privilege,
    or ``unreachable`` with the reason (and the job fails with it)."""
    device_id = run.job["targets"][0]
    dev = store.get_device(device_id)
    target = ssh.target_of(dev)
    run.event(f"connecting to {target.address}", type="step", target=device_id)
    try:
        facts, host_key = await probe(target, settings)
    except DeviceError as exc:
        exc.device_id = device_id
        store.update_device(device_id, state="unreachable", error=exc.to_dict())
        run.result(device_id, {"ok": False, "error": exc.to_dict()})
        _record_failure(exc.reason)
        raise
    return _record_online(store, run, dev, facts, host_key, first=True)


async def refresh_facts(store: Store, settings: Settings, run: JobRun) -> JSON:
    """Re-probe every target device (host keys stay pinned)."""
    ok, failed = 0, 0
    for device_id in run.job["targets"]:
        run.check_cancel()
        dev = store.get_device(device_id)
        try:
            facts, host_key = await probe(ssh.target_of(dev), settings)
        except DeviceError as exc:
            failed += 1
            run.result(device_id, {"ok": False, "error": exc.to_dict()})
            continue
        _record_online(store, run, dev, facts, host_key, first=False)
        ok += 1
    if failed and not ok:
        raise DeviceError(f"no device answered ({failed} failed)")
    return {"ok": ok, "failed": failed}


def _record_online(store: Store, run: JobRun, dev: JSON, facts: JSON, host_key: str, first: bool) -> JSON:
    pinned = dev.get("host_key")
    if pinned and host_key and pinned != host_key:  # asyncssh refuses this earlier; belt and braces
        raise HostKeyMismatch("the device presented a different host key", device_id=dev["id"])
    privilege = facts.pop("privilege")
    changes = {
        "state": "online",
        "host_key": pinned or host_key,
        "facts": facts,
        "privilege": privilege,
        "capabilities": CAPABILITIES[privilege],
        "last_seen": now(),
        "error": None,
    }
    if first:
        changes["level"] = max(int(dev.get("level") or 0), 0)
        changes["registered_at"] = now()
    store.update_device(dev["id"], **changes)
    summary = {"ok": True, "privilege": privilege, "arch": facts["arch"], "host_key": changes["host_key"]}
    run.result(dev["id"], summary)
    run.event(
        f"{dev['name']} is online ({facts['arch']}, {facts['os'] or 'unknown OS'}); account privilege: "
        f"{privilege}", type="step", target=dev["id"],
    )  # fmt: skip
    return summary


def _record_failure(reason: str) -> None:
    try:
        from evc import metrics

        metrics.record_registration_failure(reason)
    except (ImportError, AttributeError):  # metrics module is optional at this layer
        pass
