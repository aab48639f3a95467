"""The level job: raise cluster members through the function levels by running the profile's
playbooks in order, and report per device the level reached and why not higher."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

from evc import profiles
from evc.errors import LevelNotReached
from evc.jobs import JobRun, Partial
from evc.model import JSON, RUNNABLE_STATES, Cluster, Device, EventType, HostStatus, OfflinePolicy
from evc.settings import Settings
from evc.store import Store
from evc.vault import Vault

#: run one playbook on some devices in this job: (run, playbook, device ids, vars, check) ->
#: {device id: {"status": ok|failed|unreachable|refused|cancelled, "changed": bool, "message": str}}
StepRunner = Callable[[JobRun, str, list[str], JSON, bool], dict[str, JSON]]

RUNNABLE = RUNNABLE_STATES
#: where devenv puts its virtual environment unless told otherwise (playbooks/devenv.yml)
DEVENV_VENV = "evc/venv"


def fl_python(cluster: Mapping[str, Any], provisioned: bool | None = None) -> str:
    """The Python the cluster's FL client runs with: the cluster's own ``fl-client`` python var;
    else, once the members are provisioned (L1: devenv's virtual environment, with numpy),
    that environment's python; else ``python3``. *provisioned* defaults to target level >= 1."""
    cluster_vars = cluster.get("vars") or {}
    chosen = (cluster_vars.get("fl-client") or {}).get("python")
    if chosen:
        return str(chosen)
    if provisioned is None:
        provisioned = int(cluster.get("target_level") or 0) >= 1
    return provisioned_python(cluster) if provisioned else "python3"


def provisioned_python(cluster: Mapping[str, Any]) -> str:
    """The python of the virtual environment L1's devenv makes for the cluster's members."""
    venv = ((cluster.get("vars") or {}).get("devenv") or {}).get("venv")
    if not venv:
        steps = profiles.get(cluster["profile"]).steps(1)
        venv = next((s.vars.get("venv") for s in steps if s.playbook == "devenv" and s.vars.get("venv")), DEVENV_VENV)
    return f"~/{venv}/bin/python"


def cluster_vars(
    store: Store, settings: Settings, cluster: Cluster, playbook: str, step_vars: Mapping[str, Any]
) -> JSON:
    """A step's variables: the profile's, then the cluster's for that playbook, then what EVC
    derives (the k3s server's URL and the cluster's join token). Secrets are stored sealed and
    opened here, in the worker, only to build the playbook's variables."""
    box = Vault.from_settings(settings)
    out: JSON = {**step_vars, **box.open_fields((cluster.get("vars") or {}).get(playbook) or {})}
    if playbook == "fl-client":  # L4 runs the client with L1's python (numpy) unless told otherwise
        out.setdefault("python", fl_python(cluster, provisioned=True))
    if playbook == "exporter" and out.get("mode") != "container":  # L2 (host): L1's prometheus_client
        out.setdefault("python", provisioned_python(cluster))
    if playbook in ("k3s-server", "k3s-agent"):
        token = cluster.get("join_token")
        if not token:
            token = box.seal(secrets.token_hex(24))
            store.update_cluster(cluster["id"], join_token=token)
            cluster["join_token"] = token
        out.setdefault("token", box.open(token))
        server_id = cluster.get("server_id")
        if playbook == "k3s-agent" and server_id:
            server = store.get_device(server_id)
            out.setdefault("server_url", f"https://{server['host']}:6443")
    return out


def raise_level(store: Store, settings: Settings, run: JobRun, runner: StepRunner) -> JSON | Partial:
    """Run the level job. Every device reached the target: the summary (the job succeeds);
    some did not: :class:`Partial` (the job ends ``partial``); none did: LevelNotReached (the
    job fails). Each device's level and reason are in the job's results either way."""
    p = run.params
    cluster = store.get_cluster(p["cluster_id"])
    profile = profiles.get(cluster["profile"])
    target = int(p["target"])
    check = bool(p.get("check"))
    converge = bool(p.get("converge"))
    _ensure_online(store, run)
    detail, runnable = _split_runnable(store.get_devices(run.job["targets"]))
    if converge:  # recheck every step up to the target: apply only where it drifted
        runnable = [{**d, "level": 0} for d in runnable]
    steps, blocked = profiles.plan(profile, runnable, target, cluster.get("server_id"))
    for dev_id, why in blocked.items():
        detail[dev_id] = {"level": 0, "stopped": why}

    def step_vars(playbook: str, step_vars: Mapping[str, Any]) -> JSON:
        return cluster_vars(store, settings, cluster, playbook, step_vars)

    failed, changes = _run_steps(run, steps, runner, step_vars, check, converge)
    for d in runnable:
        did = d["id"]
        if did in blocked:
            continue
        before = int(store.get_device(did).get("level") or 0)
        info, recorded = level_info(target, before, failed.get(did), changes.get(did, []), check, converge)
        if recorded is not None:
            store.update_device(did, level=info["level"], level_detail=recorded)
        detail[did] = info
    for did, info in detail.items():
        run.result(did, {**info, "level_name": profiles.LEVELS.get(int(info.get("level") or 0))}, count=False)
    return level_verdict(cluster["id"], target, check, converge, detail)


def _ensure_online(store: Store, run: JobRun) -> None:
    """With ``offline: fail`` or ``wait`` the caller chose: fail fast, or wait (with a TTL)
    for the offline targets; ``skip`` (the default) leaves them out later."""
    p = run.params
    offline_policy = str(p.get("offline") or OfflinePolicy.SKIP)
    if offline_policy in (OfflinePolicy.FAIL, OfflinePolicy.WAIT):
        from evc.health import ensure_online

        ensure_online(
            store,
            run.job["targets"],
            offline_policy,
            ttl_s=float(p.get("offline_ttl_s") or 300),
            check_cancel=run.check_cancel,
        )


def _split_runnable(devices: list[Device]) -> tuple[dict[str, JSON], list[Device]]:
    """(the detail of the devices that take no new work, the devices that may)."""
    detail: dict[str, JSON] = {}
    runnable: list[Device] = []
    for d in devices:
        if d.get("state") not in RUNNABLE:
            detail[d["id"]] = {"level": int(d.get("level") or 0), "stopped": f"device is {d.get('state')}: no new work"}
        else:
            runnable.append(d)
    return detail, runnable


def _run_steps(
    run: JobRun,
    steps: list[profiles.PlannedStep],
    runner: StepRunner,
    step_vars: Callable[[str, Mapping[str, Any]], JSON],
    check: bool,
    converge: bool,
) -> tuple[dict[str, tuple[int, str]], dict[str, list[str]]]:
    """Run the planned *steps* in order, each on the devices that have not failed yet.
    Returns (device -> (the level it failed at, why), device -> the playbooks that changed
    it: would change, with *check*; drifted and were re-applied, with *converge*)."""
    failed: dict[str, tuple[int, str]] = {}
    changes: dict[str, list[str]] = {}
    run.progress(0, max(1, len(steps)))
    for i, step in enumerate(steps):
        run.check_cancel()
        ids = [d for d in step.devices if d not in failed]
        if not ids:
            continue
        vars_ = step_vars(step.playbook, step.vars)
        run.event(
            f"L{step.level} {profiles.LEVELS[step.level]}: {step.playbook} on {len(ids)} device(s)"
            + (" (check)" if check or converge else ""),
            type=EventType.LEVEL,
            level=step.level,
            playbook=step.playbook,
        )
        results = runner(run, step.playbook, ids, vars_, check or converge)
        if converge and not check:
            results.update(_reapply_drifted(run, runner, step.playbook, vars_, results, changes))
        elif check:
            for dev_id, r in results.items():
                if r.get("changed"):
                    changes.setdefault(dev_id, []).append(step.playbook)
        for dev_id, r in results.items():
            if r.get("status") != HostStatus.OK:
                why = r.get("message") or r.get("reason") or ""
                failed[dev_id] = (step.level, f"{step.playbook} {r.get('status')}: {why}".strip())
        run.progress(i + 1, len(steps))
    return failed, changes


def _reapply_drifted(
    run: JobRun, runner: StepRunner, playbook: str, vars_: JSON, checked: dict[str, JSON], changes: dict[str, list[str]]
) -> dict[str, JSON]:
    """Converging: apply *playbook* where its check found drift; the results of that run."""
    drifted = [dev_id for dev_id, r in checked.items() if r.get("status") == HostStatus.OK and r.get("changed")]
    for dev_id in drifted:
        changes.setdefault(dev_id, []).append(playbook)
    if not drifted:
        return {}
    run.event(f"{playbook} drifted on {len(drifted)} device(s): applying", type=EventType.LEVEL)
    return runner(run, playbook, drifted, vars_, False)


def level_info(
    target: int, before: int, failed: tuple[int, str] | None, changed: list[str], check: bool, converge: bool
) -> tuple[JSON, JSON | None]:
    """One device's outcome: (its result, what its record keeps as ``level_detail``; None in
    check mode, where nothing is recorded). The result holds the level it is at now (*before*
    the job, else the level below the one it *failed* at or *target*: never lower than
    *before* unless converging), why it stopped, and what would change (*check*) or was
    re-applied (*changed*). The recorded detail holds the level reached and why it stopped."""
    if failed is not None:
        lvl_failed, why = failed
        reached = lvl_failed - 1
        info: JSON = {"level": reached, "stopped": f"L{lvl_failed} {profiles.LEVELS[lvl_failed]}: {why}"}
    else:
        reached = target
        info = {"level": reached}
    if check:
        stopped = {"stopped": info["stopped"]} if "stopped" in info else {}
        return {"level": before, "would_change": changed, **stopped}, None
    recorded = dict(info)
    info["level"] = reached if converge else max(before, reached)
    if changed:
        info["reapplied"] = changed
    return info, recorded


def level_verdict(cluster_id: str, target: int, check: bool, converge: bool, detail: dict[str, JSON]) -> JSON | Partial:
    """The job's end from every device's *detail*: the summary when all reached the target
    (or in check mode), :class:`Partial` when some did, LevelNotReached when none did."""
    short: dict[str, str] = {d: i["stopped"] for d, i in detail.items() if "stopped" in i}
    summary: JSON = {
        "cluster": cluster_id, "target": target, "check": check, "converge": converge,
        "reached": sum(1 for i in detail.values() if int(i.get("level") or 0) >= target and "stopped" not in i),
        "stopped": short,
    }  # fmt: skip
    if check or not short:
        return summary
    why = "; ".join(f"{d}: {r}" for d, r in list(short.items())[:5]) + (" ..." if len(short) > 5 else "")
    if not summary["reached"]:
        raise LevelNotReached(f"no device reached L{target}: {why}", cluster=cluster_id, target=target,
                              stopped=short)  # fmt: skip
    return Partial(summary, f"{len(short)} of {len(detail)} devices did not reach L{target}: {why}")
