"""What a provision request asks for, and which devices can run it: targets, artifacts, gates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evc.choices import LOCK_MODES, RETRYABLE
from evc.errors import NotFound, ValidationError
from evc.model import JSON, RUNNABLE_STATES
from evc.provisioning.catalog import PlaybookSpec
from evc.settings import Settings
from evc.store import Store

#: per-target statuses a retry re-runs by default (AWX's "relaunch on failed hosts")
MAX_RETRIES = 5


@dataclass(frozen=True)
class RetryPolicy:
    """Re-run the hosts that ended in one of *on*, up to *max* more times, *delay_s* apart."""

    max: int = 0
    on: tuple[str, ...] = RETRYABLE
    delay_s: float = 5.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetryPolicy:
        data = data or {}
        on = tuple(data.get("on") or RETRYABLE)
        bad = set(on) - set(RETRYABLE)
        if bad:
            raise ValidationError(f"retry.on takes {list(RETRYABLE)}", field="retry.on")
        n = int(data.get("max", 0))
        if not 0 <= n <= MAX_RETRIES:
            raise ValidationError(f"retry.max is 0..{MAX_RETRIES}", field="retry.max")
        return cls(max=n, on=on, delay_s=max(0.0, float(data.get("delay_s", 5.0))))

    def to_dict(self) -> JSON:
        return {"max": self.max, "on": list(self.on), "delay_s": self.delay_s}


@dataclass(frozen=True)
class ProvisionRequest:
    """What a caller asks for: a playbook, the devices (ids or a selector) and how to run it."""

    playbook: str
    targets: tuple[str, ...] = ()
    selector: JSON | None = None
    extra_vars: JSON = field(default_factory=dict)
    check: bool = False
    forks: int | None = None
    lock: str = "wait"
    lock_timeout_s: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_of: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProvisionRequest:
        lock = str(data.get("lock") or "wait")
        if lock not in LOCK_MODES:
            raise ValidationError("lock is 'wait' or 'fail'", field="lock")
        forks = data.get("forks")
        if forks is not None and not 1 <= int(forks) <= 500:
            raise ValidationError("forks is 1..500", field="forks")
        return cls(
            playbook=str(data.get("playbook") or ""),
            targets=tuple(data.get("targets") or ()),
            selector=dict(data["selector"]) if data.get("selector") else None,
            extra_vars=dict(data.get("extra_vars") or {}),
            check=bool(data.get("check", False)),
            forks=int(forks) if forks is not None else None,
            lock=lock,
            lock_timeout_s=float(data.get("lock_timeout_s") or 300.0),
            retry=RetryPolicy.from_dict(data.get("retry")),
            retry_of=data.get("retry_of"),
        )


# ------------------------------------------------------------------------------- resolving
def resolve_targets(store: Store, targets: Sequence[str] = (), selector: Mapping[str, Any] | None = None) -> list[str]:
    """Device ids from explicit ids (all must exist) or a selector ``{labels, cluster}``."""
    if targets and selector:
        raise ValidationError("give targets or a selector, not both", field="targets")
    if targets:
        ids = list(dict.fromkeys(targets))
        found = {d["id"] for d in store.get_devices(ids)}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"no such device: {', '.join(missing)}", devices=missing)
        return ids
    if not selector:
        raise ValidationError("give targets (device ids) or a selector", field="targets")
    labels: Mapping[str, str] = selector.get("labels") or {}
    cluster = selector.get("cluster")
    if not labels and not cluster:
        raise ValidationError("a selector needs labels and/or a cluster", field="selector")
    ids = [
        d["id"]
        for d in store.all_devices()
        if all((d.get("labels") or {}).get(k) == v for k, v in labels.items())
        and (not cluster or d.get("cluster_id") == cluster)
    ]
    if not ids:
        raise ValidationError("the selector matches no device", field="selector")
    return ids


def artifact_root(settings: Settings) -> Path:
    """Where operators put the files playbooks install (k3s binaries, runtime archives)."""
    return settings.data_dir / "artifacts"


def resolve_artifacts(spec: PlaybookSpec, values: JSON, settings: Settings) -> JSON:
    """Artifact parameters as absolute paths inside the artifact directory, or a 422."""
    out = dict(values)
    root = artifact_root(settings).resolve()
    for name in spec.artifact_params():
        val = out.get(name)
        if not val:
            continue
        path = Path(str(val))
        full = (path if path.is_absolute() else root / path).resolve()
        if not full.is_relative_to(root) or not full.is_file():
            raise ValidationError(
                f"{name}: {val!r} is not a file in EVC's artifact directory {root}",
                field=f"extra_vars.{name}",
            )
        out[name] = str(full)
    return out


def refusal(spec: PlaybookSpec, dev: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when *dev* cannot run *spec* now, else None."""
    state = dev.get("state")
    if state not in RUNNABLE_STATES:
        shown = state or "not registered"
        return "offline", f"the device is {shown}; playbooks run on online devices only"
    if not dev.get("host_key"):
        return "not_registered", "the device has no pinned host key; register it first"
    why = spec.refusal(dev.get("privilege"))
    if why:
        return "privilege", why
    return None


def gate(spec: PlaybookSpec, devices: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Every device that cannot run *spec*, with the reason (pure; unit-tested)."""
    out: dict[str, tuple[str, str]] = {}
    for dev in devices:
        why = refusal(spec, dev)
        if why:
            out[str(dev["id"])] = why
    return out
