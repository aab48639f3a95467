"""What a deployment needs of its devices before it is shipped: the function level.

Runtime ``process`` runs the edge server with the Python L1 (provisioned: devenv's virtual
environment) gives a cluster's members, unless the deployment names its ``python``: then L0
(connected) is enough. Runtime ``container`` needs L3 (deployable: a container runtime).
With ``ensure_level`` (the default) a deployment below that level raises the cluster's level
first (the ordinary level job, :func:`evc.clusters.raise_level`) and its ``deploy`` job waits for
it (``params.after``); without it, the deployment is refused (412) with what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from evc import profiles
from evc.context import Context
from evc.errors import PreconditionFailed
from evc.model import Device
from evc.store import Store

#: the level each runtime needs (process: L1's Python unless the deployment names one)
RUNTIME_LEVEL = {"process": 1, "container": 3}


def required_level(runtime: str, python_given: bool) -> int:
    """The function level a device needs to run a deployment of *runtime* (pure)."""
    if runtime == "process" and python_given:
        return 0
    return RUNTIME_LEVEL.get(runtime, 0)


def below(devices: Sequence[Mapping[str, Any]], level: int, runtime: str = "process") -> list[Mapping[str, Any]]:
    """The devices under *level* that lack what it gives *runtime* (pure): a device whose facts
    show a container runtime (podman, docker) has what a ``container`` deployment needs of L3
    (the deploy job still checks that it answers for EVC's account)."""
    return [d for d in devices if int(d.get("level") or 0) < level and not _has_runtime(d, runtime)]


def _has_runtime(device: Mapping[str, Any], runtime: str) -> bool:
    facts = device.get("facts") or {}
    return runtime == "container" and bool(facts.get("podman") or facts.get("docker"))


def _hint(names: list[str], level: int, clusters: dict[str, str], runtime: str) -> str:
    what = f"L{level} ({profiles.LEVELS.get(level, '')})"
    raise_it = "; ".join(f"evc cluster level {n} {level}" for n in sorted(set(clusters.values()))) or (
        "add them to a cluster and raise its level"
    )
    return (
        f"{len(names)} device(s) below {what}, which runtime {runtime!r} needs: {', '.join(names[:5])}"
        + (" ..." if len(names) > 5 else "")
        + f"; raise the level first ({raise_it}), deploy with ensure_level true"
        + (", or name the devices' python" if runtime == "process" else "")
    )


def ensure(ctx: Context, device_ids: Sequence[str], runtime: str, python_given: bool, ensure_level: bool) -> list[str]:
    """Check the devices' level for *runtime*: the level jobs started to raise it (their ids;
    empty when every device is there). Raises PreconditionFailed when devices are below it and
    *ensure_level* is off, or they are in no cluster (no profile says how to raise them)."""
    store = ctx.store
    level = required_level(runtime, python_given)
    low = cast(list[Device], below(store.get_devices(device_ids), level, runtime))
    if not low:
        return []
    names = [str(d.get("name") or d["id"]) for d in low]
    clusters = _cluster_names(store, low)
    orphans = [str(d.get("name") or d["id"]) for d in low if not d.get("cluster_id")]
    if not ensure_level or orphans:
        why = _hint(names, level, clusters, runtime)
        if orphans:
            why += f" ({', '.join(orphans[:5])} in no cluster: nothing can raise their level)"
        raise PreconditionFailed(why, devices=[d["id"] for d in low], level=level)
    from evc.clusters import raise_level

    jobs = []
    for cid in sorted({str(d["cluster_id"]) for d in low}):
        target = max(level, int(store.get_cluster(cid).get("target_level") or 0))
        # a repeated request (its Idempotency-Key) gets the level job it started the first time
        key = None
        if ctx.idempotency_key:  # "<scope> <key>\n<fingerprint>": a key of its own, the same fingerprint
            head, _, fingerprint = ctx.idempotency_key.partition("\n")
            key = f"{head}/level/{cid}\n{fingerprint}"
        jobs.append(str(raise_level(ctx.with_key(key), cid, target)["id"]))
    return jobs


def _cluster_names(store: Store, devices: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    out = {}
    for cid in {str(d["cluster_id"]) for d in devices if d.get("cluster_id")}:
        out[cid] = str(store.get_cluster(cid).get("name") or cid)
    return out


__all__ = ["RUNTIME_LEVEL", "below", "ensure", "required_level"]
