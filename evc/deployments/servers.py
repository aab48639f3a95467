"""After a health sweep: the deployments' edge servers on the devices that answered, checked;
one that no longer listens (the device rebooted, the server or its container died) is marked
``failed`` with the reason and re-converged by a ``deploy`` job (``params.converge``, reason
``server down``), without an operator.

A device that was lost and comes back is re-converged by :func:`evc.deployments.converge.on_health`;
this covers the device that rebooted between two sweeps (it never looked offline) and a server
that died alone. The check is one command per device that serves a deployment, shell builtins
and one ``grep`` over ``/proc/net/tcp{,6}``: is each deployment's port listening? It works for
both runtimes (a container runs with ``--network host``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import asyncssh

from evc import pool as pooling
from evc import ssh
from evc.context import Context
from evc.deployments import converge, events
from evc.errors import DeviceError
from evc.model import RUNNABLE_STATES, DeploymentDeviceState, DeploymentState, Job
from evc.settings import Settings

#: deployment states whose servers are checked (not while a job deploys, rolls out or removes)
CHECKED = (str(DeploymentState.RUNNING), str(DeploymentState.PARTIAL))
REASON = "server not answering on port {port} (the device rebooted or the server stopped): re-converging"


def probe_command(ports: Iterable[int]) -> str:
    """Prints ``up <port>`` or ``down <port>`` for each port: is a socket listening on it. Pure."""
    checks = []
    for port in sorted({int(p) for p in ports}):
        pattern = f":{port:04X} [0-9A-F]+:0000 0A "
        checks.append(f"if grep -qE '{pattern}' /proc/net/tcp /proc/net/tcp6 2>/dev/null; "
                      f"then echo 'up {port}'; else echo 'down {port}'; fi")  # fmt: skip
    return "; ".join(checks) or "true"


def parse_probe(text: str) -> set[int]:
    """The ports :func:`probe_command` found down. Pure."""
    out = set()
    for line in text.splitlines():
        word, _, port = line.strip().partition(" ")
        if word == "down" and port.isdigit():
            out.add(int(port))
    return out


def _port(state: Mapping[str, Any]) -> int | None:
    _, _, port = str(state.get("endpoint") or "").rpartition(":")
    return int(port) if port.isdigit() else None


def serving(store: Any, device_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """device id -> {deployment id: port} of the servers that should answer on *device_ids*."""
    devices = set(device_ids)
    out: dict[str, dict[str, int]] = {}
    for dep in converge._deployments(store):
        if dep["state"] not in CHECKED:
            continue
        for dev_id, state in store.deployment_devices(dep["id"]).items():
            port = _port(state)
            if dev_id in devices and dev_id in dep["devices"] and state.get("state") in converge.SERVING and port:
                out.setdefault(dev_id, {})[dep["id"]] = port
    return out


async def _down(pool: pooling.SSHPool, settings: Settings, devices: Sequence[Mapping[str, Any]],
                wanted: Mapping[str, Mapping[str, int]]) -> dict[str, set[int]]:  # fmt: skip
    async def one(dev: Mapping[str, Any]) -> tuple[str, set[int]]:
        async def op(conn: asyncssh.SSHClientConnection, target: ssh.Target) -> set[int]:
            res = await ssh.run(conn, probe_command(wanted[dev["id"]].values()), target, settings, check=False,
                                timeout=settings.health_timeout_s)  # fmt: skip
            return parse_probe(str(res.stdout or "")) if res.exit_status == 0 else set()

        try:
            return dev["id"], await pool.use(dev, op)
        except DeviceError:  # the next sweep's business
            return dev["id"], set()

    return dict(await asyncio.gather(*(one(d) for d in devices)))


def revive(ctx: Context, answered: Iterable[str], *, pool: pooling.SSHPool | None = None) -> list[Job]:
    """Check the servers on the devices that *answered* the sweep (online or degraded); re-converge
    the deployments whose server is down there: the ``deploy`` jobs submitted."""
    store, settings = ctx.store, ctx.settings
    wanted = serving(store, answered)
    devices = [d for d in store.get_devices(list(wanted)) if d.get("state") in RUNNABLE_STATES]
    if not devices:
        return []
    down = pooling.call(_down(pool or pooling.pool_for(settings), settings, devices, wanted))
    stopped: dict[str, list[str]] = {}
    for dev_id, ports in down.items():
        for dep_id, port in wanted[dev_id].items():
            if port in ports:
                stopped.setdefault(dep_id, []).append(dev_id)
    jobs, published = [], []
    for dep_id, dev_ids in stopped.items():
        dep, states = store.get_deployment(dep_id), store.deployment_devices(dep_id)
        for dev_id in dev_ids:
            old = states.get(dev_id) or {}
            store.set_deployment_device(dep_id, dev_id, {**old, "state": DeploymentDeviceState.FAILED,
                                                         "reason": REASON.format(port=_port(old))})  # fmt: skip
        converge._settle(store, dep_id)
        after = (store.get_deployment(dep_id), store.deployment_devices(dep_id))
        published += events.changes("deploy", (dep, states), after, converge._names(store, dev_ids))
        jobs.append(converge._converge(ctx, dep, dev_ids, "server down"))
        store.audit(converge.ACTOR, "deployment.server_down", dep_id, devices=len(dev_ids))
    events.publish(settings, published)
    return jobs


__all__ = ["parse_probe", "probe_command", "revive", "serving"]
