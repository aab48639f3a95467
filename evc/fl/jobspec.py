"""An FL job's parameters and what the round engine (:mod:`evc.fl.orchestrator`) needs
around them: its dispatcher, which devices may train, where checkpoints and test sets live."""

from __future__ import annotations

import os
import posixpath
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from evc.errors import NotFound, ValidationError
from evc.fl.models import Model, load_model
from evc.fl.strategy import Strategy, make_strategy
from evc.model import ACTIVE_PHASES as ACTIVE_PHASES  # re-exported (evc.fl.orchestrator)
from evc.model import DeviceState
from evc.settings import Settings
from evc.store import JSON

#: seconds a training task's lease on (round, device) lives without a refresh
LEASE_S = 3.0
#: how often a training task refreshes its lease and checks for a stop while it waits
TICK_S = 0.25
#: seconds the aggregation of one round may hold its lock
CLOSE_LEASE_S = 60.0
#: the reference test split of FEDERATED.md, evaluated server-side when a job names it
BUILTIN_TEST_SETS = ("digits",)


class Dispatcher(Protocol):
    """What the round engine needs of the task queue (Celery in :mod:`evc.tasks.fl`)."""

    def fit_round(self, job_id: str, token: str, device_ids: Sequence[str], queue: str) -> None:
        """Train on each device (:meth:`Rounds.fit`), then close the round (:meth:`Rounds.close`)."""
        ...

    def close_round(self, job_id: str, token: str, queue: str) -> None:
        """Run :meth:`Rounds.close` alone (its trigger was lost)."""
        ...

    def start_round(self, job_id: str, round: int, queue: str, countdown: float) -> None:
        """Run :meth:`Rounds.start_round` after *countdown* seconds."""
        ...

    def recover(self, job_id: str | None, countdown: float, queue: str = "fl") -> None:
        """Run :meth:`Rounds.recover` after *countdown* seconds."""
        ...


# ---------------------------------------------------------------------- the job's parameters
def checkpoint_dir(settings: Settings) -> Path:
    return settings.data_dir / "fl" / "checkpoints"


def evaluation_dir(settings: Settings) -> Path:
    return settings.data_dir / "fl" / "test-sets"


def fl_ready(device: Mapping[str, Any]) -> bool:
    """Whether a device can take part: function level 4, or the FL client installed."""
    return int(device.get("level") or 0) >= 4 or bool(device.get("fl_client"))


def eligibility(device: Mapping[str, Any]) -> str | None:
    """Why a device sits this round out (None: it can train)."""
    if not fl_ready(device):
        return (
            "the FL client is not installed (run the fl-client playbook or `evc fl install`) "
            "and the device is below function level 4"
        )
    state = device.get("state")
    if state != DeviceState.ONLINE:
        why = health_detail(device.get("health"))
        return f"the device is {state}" + (f" ({why})" if why else "")
    return None


def record_fl_client(store: Any, device_id: str, values: Mapping[str, Any]) -> None:
    """Mark *device_id* ready for FL after the ``fl-client`` playbook succeeded on it (the
    provisioning service's per-playbook success hook), with the plug-ins it now holds. A device
    removed while the job ran stays removed."""
    try:
        device = store.get_device(device_id)
    except NotFound:
        return
    plugins = set((device.get("fl_client") or {}).get("plugins") or [])
    if values.get("plugin"):
        plugins.add(posixpath.basename(str(values["plugin"]))[: -len(".py")])
    store.update_device(device_id, fl_client={
        **(device.get("fl_client") or {}), "python": values.get("python", "python3"),
        "path": "~/.evc/fl/client.py", "via": "fl-client playbook", "plugins": sorted(plugins),
        "installed_at": time.time(),
    })  # fmt: skip


def health_detail(health: Mapping[str, Any] | None) -> str:
    """What the health checks last said of a device that is not online: the thresholds it
    breaches, or its missed checks and their error ("" when nothing was recorded). Pure."""
    if not health:
        return ""
    parts = [str(b) for b in health.get("breaches") or []]
    misses = int(health.get("misses") or 0)
    if misses:
        err = health.get("error") or {}
        what = (
            f"{err.get('reason', 'error')}: {err.get('message', 'no answer')}" if isinstance(err, Mapping) else str(err)
        )
        parts.append(f"{misses} missed health check{'s' if misses > 1 else ''} ({what})")
    return "; ".join(parts)


#: :func:`eligibility`'s reason for a degraded device starts so (it may still make up a round's numbers)
DEGRADED = "the device is degraded"


@dataclass(frozen=True)
class FLSpec:
    """An FL job's parameters as stored on the job (validated when it was submitted)."""

    devices: tuple[str, ...]
    rounds: int
    strategy: str
    strategy_params: Mapping[str, Any]
    data: Mapping[str, Any]
    round_timeout: float = 60.0
    python: str = "python3"
    test_set: str | None = None
    queue: str = "fl"
    n_features: int = 64
    n_classes: int = 10
    #: ``{"name", "version"}``: register the global model when the job succeeds (or None)
    export: Mapping[str, str] | None = None

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> FLSpec:
        try:
            return cls(
                devices=tuple(p["devices"]),
                rounds=int(p["rounds"]),
                strategy=str(p["strategy"]),
                strategy_params=dict(p["strategy_params"]),
                data=dict(p["data"]),
                round_timeout=float(p.get("round_timeout", 60.0)),
                python=str(p.get("python", "python3")),
                test_set=p.get("test_set"),
                queue=str(p.get("queue", "fl")),
                n_features=int(p.get("n_features") or 64),
                n_classes=int(p.get("n_classes") or 10),
                export=dict(p["export"]) if p.get("export") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"not an FL job's parameters: {exc!r}") from exc

    def to_params(self) -> JSON:
        return {
            "devices": list(self.devices), "rounds": self.rounds, "strategy": self.strategy,
            "strategy_params": dict(self.strategy_params), "data": dict(self.data),
            "round_timeout": self.round_timeout, "python": self.python,
            "test_set": self.test_set, "queue": self.queue,
            "n_features": self.n_features, "n_classes": self.n_classes,
            **({"export": dict(self.export)} if self.export else {}),
        }  # fmt: skip

    @property
    def model(self) -> str:
        return str(self.strategy_params.get("model", "softmax"))

    @property
    def client_index(self) -> dict[str, int]:
        """Each device's stable 0-based index in the job (it seeds the batch order)."""
        return {d: i for i, d in enumerate(self.devices)}

    def make_strategy(self) -> Strategy:
        return make_strategy(self.strategy, **self.strategy_params)

    def load_model(self) -> Model:
        return load_model(self.model, n_features=self.n_features, n_classes=self.n_classes)

    def data_path(self, job_id: str, device: Mapping[str, Any]) -> str:
        """The shard path on *device*: ``data.paths[id]`` or the ``data.path`` template with
        ``{job}``, ``{device}``, ``{name}`` and ``{index}``."""
        paths = self.data.get("paths") or {}
        if device["id"] in paths:
            return str(paths[device["id"]])
        template = str(self.data.get("path") or "")
        return template.format(
            job=job_id, device=device["id"], name=device.get("name", device["id"]),
            index=self.client_index.get(str(device["id"]), 0),
        )  # fmt: skip


def default_owner() -> str:
    """Who holds a lease: host, process and a random part (threads of one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
