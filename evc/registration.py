"""Device registration: connect with EVC's key, pin the host key, probe facts and privilege."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evc import health, ssh
from evc.errors import BatchFailed, DeviceError, HostKeyMismatch, JumpHostKeyMismatch
from evc.jobs import JobRun
from evc.model import JSON, DeviceState, EventType, Privilege
from evc.settings import Settings
from evc.store import Store, now

#: One POSIX sh script, run once over one channel: a ``key=value`` line per fact. It spawns as
#: few processes as it can (five commands: id, uname, nproc, df, python3): file contents are read
#: with shell built-ins, and df's output through a here-document (no pipeline, whose reading
#: group is one more process, inside a command substitution, one more).
PROBE = r"""
echo "id=$(id)"
echo "uname=$(uname -n -r -m)"
if [ -r /etc/os-release ]; then
  while IFS= read -r l; do case "$l" in PRETTY_NAME=*) echo "os=${l#PRETTY_NAME=}";; esac; done < /etc/os-release
fi
echo "cpus=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null)"
if [ -r /proc/meminfo ]; then read -r _ kb _ < /proc/meminfo; echo "mem_kb=$kb"; fi
{ read -r _; read -r _ total _ free _; } <<EOF
$(df -Pk "$HOME" 2>/dev/null)
EOF
echo "df=$total $free"
if command -v python3 >/dev/null 2>&1; then echo "python3=$(python3 --version 2>&1)"; fi
command -v docker >/dev/null 2>&1 && echo "docker=1"
command -v containerd >/dev/null 2>&1 && echo "containerd=1"
command -v podman >/dev/null 2>&1 && echo "podman=1"
[ -d /run/systemd/system ] && echo "systemd=1"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null |
    while IFS= read -r g; do echo "gpu=$g"; done
fi
command -v tegrastats >/dev/null 2>&1 && echo "tegrastats=1"
if [ -r /etc/nv_tegra_release ]; then read -r j < /etc/nv_tegra_release; echo "jetson=$j"; fi
if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo "sudo=1"; fi
"""

_ID = re.compile(r"uid=(\d+)\(([^)]*)\)")
_PYVER = re.compile(r"(\d+\.\d+(?:\.\d+)?)")

#: What each privilege level lets EVC do on a device (the seed: exactly the account's rights).
CAPABILITIES: dict[str, list[str]] = {
    Privilege.ROOT: [
        "run commands as root",
        "install and update OS packages",
        "install system services (systemd units)",
        "install a container runtime (docker/containerd)",
        "join k3s/k8s clusters",
        "user-space installs (virtual environments, ~/.local)",
    ],
    Privilege.SUDO: [
        "run commands as root through passwordless sudo",
        "install and update OS packages",
        "install system services (systemd units)",
        "install a container runtime (docker/containerd)",
        "join k3s/k8s clusters",
        "user-space installs (virtual environments, ~/.local)",
    ],
    Privilege.USER: [
        "user-space installs only (virtual environments, ~/.local, workspace in $HOME)",
        "user-level services or supervised background processes",
        "cannot install OS packages, system services, a container runtime or k3s/k8s",
    ],
}

_NUM = re.compile(r"^\d+$")


def _int(value: str | None) -> int | None:
    return int(value) if value and _NUM.match(value) else None


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
            gpus.append({"name": name.strip() or value, "memory_mb": _int(mem)})
        else:
            raw[key] = value
    idm = _ID.search(raw.get("id", ""))
    uid = int(idm.group(1)) if idm else None
    uname = raw.get("uname", "").split()
    hostname, kernel, arch = (uname + ["", "", ""])[:3] if len(uname) >= 3 else ("", "", "")
    df = raw.get("df", "").split()
    total_kb, free_kb = (_int(df[0]), _int(df[1])) if len(df) == 2 else (None, None)
    mem_kb = _int(raw.get("mem_kb"))
    pyver = _PYVER.search(raw.get("python3", ""))
    facts: JSON = {
        "arch": arch,
        "os": raw.get("os", "").strip('"'),
        "kernel": kernel,
        "hostname": hostname,
        "user": idm.group(2) if idm else "",
        "uid": uid,
        "cpus": _int(raw.get("cpus")),
        "memory_bytes": mem_kb * 1024 if mem_kb is not None else None,
        "disk_bytes": total_kb * 1024 if total_kb is not None else None,
        "disk_free_bytes": free_kb * 1024 if free_kb is not None else None,
        "python3": pyver.group(1) if pyver else None,
        "docker": raw.get("docker") == "1",
        "containerd": raw.get("containerd") == "1",
        "podman": raw.get("podman") == "1",
        "systemd": raw.get("systemd") == "1",
        "gpus": gpus,
        "jetson": raw.get("jetson") or ("tegrastats" if raw.get("tegrastats") == "1" else None),
    }
    if uid == 0:
        facts["privilege"] = Privilege.ROOT
    elif raw.get("sudo") == "1":
        facts["privilege"] = Privilege.SUDO
    else:
        facts["privilege"] = Privilege.USER
    return facts


@dataclass(frozen=True)
class Probed:
    """What a probe found: the facts, and the host keys the device and its jump host presented."""

    facts: JSON
    host_key: str
    jump_host_key: str | None = None


async def probe(target: ssh.Target, settings: Settings) -> Probed:
    """Connect (keys not pinned yet are learned), run the probe, return what it found."""
    async with ssh.session(target, settings, learn_keys=True) as conn:
        host_key = conn.get_server_host_key()
        jump_key = ssh.jump_host_key(conn)
        res = await ssh.run(conn, "sh -s", target, settings, input=PROBE)
    facts = parse_facts(str(res.stdout or ""))
    return Probed(facts, ssh.key_line(host_key) if host_key else "", jump_key)


async def register(store: Store, settings: Settings, run: JobRun) -> JSON:
    """The registration job: the device ends ``online`` with pinned key, facts and privilege,
    or ``unreachable`` with the reason (and the job fails with it)."""
    device_id = run.job["targets"][0]
    dev = store.get_device(device_id)
    target = ssh.target_of(dev)
    run.event(f"connecting to {target.address}", type=EventType.STEP, target=device_id)
    try:
        found = await probe(target, settings)
    except DeviceError as exc:
        exc.device_id = device_id
        store.update_device(device_id, state=DeviceState.UNREACHABLE, error=exc.to_dict())
        run.result(device_id, {"ok": False, "error": exc.to_dict()})
        _record_failure(exc.reason)
        raise
    return record_online(store, run, dev, found, first=True)


async def register_all(store: Store, settings: Settings, run: JobRun, concurrency: int = 16) -> JSON:
    """A batch registration (a fleet import): every target is probed, each one's outcome is its
    result (``ok``, or the error with its reason); one unreachable device never stops the others.
    Fails, after all of them, when any device did not register."""
    import asyncio

    gate = asyncio.Semaphore(concurrency)
    failed: dict[str, str] = {}

    async def one(device_id: str) -> None:
        async with gate:
            dev = store.get_device(device_id)
            run.event(f"connecting to {dev['name']}", type=EventType.STEP, target=device_id)
            try:
                record_online(store, run, dev, await probe(ssh.target_of(dev), settings), first=True)
            except DeviceError as exc:
                exc.device_id = device_id
                store.update_device(device_id, state=DeviceState.UNREACHABLE, error=exc.to_dict())
                run.result(device_id, {"ok": False, "name": dev["name"], "error": exc.to_dict()})
                run.event(f"{dev['name']}: {exc}", type=EventType.STEP, target=device_id, level="error")
                _record_failure(exc.reason)
                failed[dev["name"]] = str(exc)

    await asyncio.gather(*(one(d) for d in run.job["targets"]))
    total = len(run.job["targets"])
    if failed:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(failed.items()))
        raise BatchFailed(f"{len(failed)} of {total} devices did not register — {reasons}")
    return {"ok": total, "failed": 0}


async def refresh_facts(store: Store, settings: Settings, run: JobRun) -> JSON:
    """Re-probe every target device (host keys stay pinned)."""
    ok, failed = 0, 0
    for device_id in run.job["targets"]:
        run.check_cancel()
        dev = store.get_device(device_id)
        try:
            found = await probe(ssh.target_of(dev), settings)
        except DeviceError as exc:
            failed += 1
            run.result(device_id, {"ok": False, "error": exc.to_dict()})
            continue
        record_online(store, run, dev, found, first=False)
        ok += 1
    if failed and not ok:
        raise DeviceError(f"no device answered ({failed} failed)")
    return {"ok": ok, "failed": failed}


def record_online(
    store: Store, run: JobRun, dev: Mapping[str, Any], found: Probed, first: bool, also: JSON | None = None
) -> JSON:
    """*dev* answered a probe: record it reachable (online, or degraded as it was for a threshold;
    see :func:`evc.health.verified`) with its keys pinned, facts and privilege
    (and *also*: changed connection fields, written in the same update)."""
    pinned = dev.get("host_key")
    if pinned and found.host_key and pinned != found.host_key:  # asyncssh refuses this earlier
        raise HostKeyMismatch("the device presented a different host key", device_id=dev["id"])
    facts = dict(found.facts)
    privilege = facts.pop("privilege")
    state: str = DeviceState.ONLINE
    health_rec = dev.get("health")
    if health_rec is not None:  # checked before: the misses end, a threshold breach stays
        a = health.verified(dev.get("state"), health_rec, now())
        state, health_rec = a.state, a.health
        if a.changed:
            store.log_event(health.state_event(dev, a))
    changes: JSON = {
        **(also or {}),
        "state": state,
        "health": health_rec,
        "host_key": pinned or found.host_key,
        "facts": facts,
        "privilege": privilege,
        "capabilities": CAPABILITIES[privilege],
        "last_seen": now(),
        "error": None,
    }
    jump = dev.get("jump_host")
    if jump:
        changes["jump_host"] = pin_jump_host(jump, found.jump_host_key, dev["id"])
    if first:
        changes["level"] = max(int(dev.get("level") or 0), 0)
        changes["registered_at"] = now()
    store.update_device(dev["id"], **changes)
    summary = {"ok": True, "name": dev["name"], "privilege": privilege, "arch": facts["arch"],
               "host_key": changes["host_key"]}  # fmt: skip
    if jump:
        summary["jump_host_key"] = changes["jump_host"]["host_key"]
    run.result(dev["id"], summary)
    run.event(
        f"{dev['name']} is {state} ({facts['arch']}, {facts['os'] or 'unknown OS'}); account privilege: "
        f"{privilege}", type=EventType.STEP, target=dev["id"],
    )  # fmt: skip
    return summary


def pin_jump_host(jump: JSON, presented: str | None, device_id: str) -> JSON:
    """The jump host record with its key pinned: the pin it had, else the key it presented."""
    pinned = jump.get("host_key")
    if pinned and presented and pinned != presented:  # asyncssh refuses this earlier
        raise JumpHostKeyMismatch(
            f"the host key of jump host {jump.get('username')}@{jump.get('host')}:{jump.get('port', 22)} changed",
            device_id=device_id,
        )
    return {**jump, "host_key": pinned or presented}


def _record_failure(reason: str) -> None:
    try:
        from evc import metrics

        metrics.record_registration_failure(reason)
    except (ImportError, AttributeError):  # metrics module is optional at this layer
        pass
