"""The round engine of FL jobs: start, select, train on each device, aggregate, checkpoint, recover.

Plain, typed code over a :class:`~evc.store.Store`, the settings and a :class:`Dispatcher` (what
it needs of Celery: a round's canvas, a delayed round start, a recovery check), so it runs and is
tested without a broker. :mod:`evc.tasks.fl` gives it thin Celery entry points.

A round ``r`` of job ``j``:

1. :meth:`Rounds.start_round` selects the devices (online, FL client installed, seeded
   ``fraction_fit`` sampling, at least ``min_available_clients``), opens round attempt *token*
   in the job's FL state (phase ``training``, a deadline ``round_timeout`` away) and dispatches
   the round: one :meth:`Rounds.fit` per device and one :meth:`Rounds.close` after them.
2. :meth:`Rounds.fit` trains on one device through its long-lived client channel
   (:mod:`evc.fl.channels`) and records the outcome -- the update, or the failure -- keyed by
   (job, token, device), first write wins: a redelivered or duplicate task is a no-op. A lease
   per (token, device) lets a duplicate wait for a live original instead of training twice.
3. :meth:`Rounds.close` runs when every selected device has an outcome, or once the deadline
   has passed: it folds the updates one at a time in client order (streaming, O(model) memory,
   bit-for-bit the same as the in-process reference), evaluates on the server's test set,
   checkpoints the new global model with the strategy's state, records the round, and only then
   starts round ``r + 1``. Failures are data in the round record; results that come after the
   close are discarded and recorded as late.

A worker killed mid-round loses its tasks (with Redis the broker gives them back only after its
visibility timeout). :meth:`Rounds.recover` -- run when a worker starts, and by ``resume`` on a
running job -- finds rounds whose devices have neither an outcome nor a live lease, extends the
deadline and dispatches the round again; devices already done are no-ops, so nothing is lost or
counted twice. A stop takes effect at the round boundary: a round cut short by it is discarded,
and ``resume`` starts again from the last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import socket
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from evc import pool as pooling
from evc.errors import (
    ConfigError,
    DeviceError,
    EVCError,
    PreconditionFailed,
    SSHTimeout,
    ValidationError,
)
from evc.fl import channels
from evc.fl.checkpoint import latest_round, load_checkpoint, save_checkpoint
from evc.fl.data import load_shard
from evc.fl.models import Model, is_device_model, load_model
from evc.fl.protocol import (
    decode_params,
    fit_request,
    get_parameters_request,
    parse_fit_reply,
    parse_get_parameters_reply,
)
from evc.fl.strategy import FitFailure, Strategy, make_strategy
from evc.jobs import JobRun
from evc.jobs import get as get_job
from evc.model import (
    ACTIVE_PHASES,
    BETWEEN_ROUNDS,
    IN_ROUND,
    JSON,
    DeviceState,
    EventType,
    FLPhase,
    Job,
    JobState,
)
from evc.settings import Settings
from evc.store import Store, now

log = logging.getLogger(__name__)

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
        return f"the device is {state}"
    return None


#: :func:`eligibility`'s reason for a degraded device (it may still make up a round's numbers)
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


# ---------------------------------------------------------------------- the engine
@dataclass
class Rounds:
    """Runs the rounds of FL jobs over a store, settings and a dispatcher (see module doc)."""

    store: Store
    settings: Settings
    dispatch: Dispatcher
    owner: str = field(default_factory=default_owner)

    # ------------------------------------------------------------------ start and resume
    def start(self, job_id: str) -> str:
        """Start (or resume, after a stop or failure) a job from its latest checkpoint."""
        run = JobRun.start(self.store, job_id)
        if run is None:
            return "skipped"
        if run.cancelled():
            self._stop(run, "stopped before it started")
            return "cancelled"
        try:
            spec = FLSpec.from_params(run.params)
            st = self.store.fl_state(job_id)
            attempt = int(run.job.get("attempt") or 0)
            if st and st.get("phase") in ACTIVE_PHASES and st.get("attempt") == attempt:
                self.recover(job_id)  # a redelivered start of a job already under way
                return "running"
            directory = checkpoint_dir(self.settings)
            latest = latest_round(directory, job_id)
            if latest is None:
                params = self._initial_params(run, spec)
                save_checkpoint(directory, job_id, 0, params, metadata={"round": 0})
                latest = 0
            self.store.fl_init(job_id, {
                "phase": FLPhase.CLOSED, "round": latest, "next_round": latest + 1, "token": None,
                "attempt": attempt, "rounds": spec.rounds, "queue": spec.queue, "first_round": latest + 1,
            })  # fmt: skip
            if latest >= spec.rounds:
                self._finish(run, spec)
                return "succeeded"
            run.progress(done=latest, total=spec.rounds, round=latest)
            what = "starting" if latest == 0 else f"resuming from the checkpoint of round {latest}"
            run.event(f"{what}: {spec.rounds} rounds on {len(spec.devices)} devices", type=EventType.FL)
            return self.start_round(job_id, latest + 1)
        except EVCError as exc:
            self.fail_job(run, exc)
            return "failed"

    def start_round(self, job_id: str, round: int) -> str:
        """Select this round's devices and dispatch it (idempotent: only from the state that
        round ``round`` is next, or waiting for devices)."""
        job = get_job(self.store, job_id)
        run = JobRun(self.store, job)
        if job["state"] != JobState.RUNNING:
            return "not running"
        spec = FLSpec.from_params(job["params"])
        if run.cancelled():
            self._stop(run, f"stopped before round {round}")
            return "cancelled"
        st = self.store.fl_state(job_id) or {}
        if st.get("phase") not in BETWEEN_ROUNDS or st.get("next_round") != round:
            return "not due"  # a stale or duplicate start
        devices = {d["id"]: d for d in self.store.get_devices(spec.devices)}
        skipped = {d: "the device was removed" for d in spec.devices if d not in devices}
        for dev_id, dev in devices.items():
            reason = eligibility(dev)
            if reason:
                skipped[dev_id] = reason
        strategy = spec.make_strategy()
        # health-aware: degraded devices sit out while enough healthy ones can train; when too
        # few can, degraded ones (slow, not broken) make up the number, in job order
        short = strategy.plan.min_available_clients - sum(1 for d in spec.devices if d not in skipped)
        for dev_id in [d for d in spec.devices if skipped.get(d) == DEGRADED][: max(0, short)]:
            del skipped[dev_id]
        available = [d for d in spec.devices if d not in skipped]
        if not available and st.get("first_round") == round:
            # nothing to wait for at the start: fail now, saying why for each device
            self.fail_job(run, PreconditionFailed(
                f"no device can train round {round}: " + "; ".join(f"{d}: {why}" for d, why in skipped.items()),
                round=round, unavailable=skipped,
            ))  # fmt: skip
            return "failed"
        try:
            plan = strategy.configure_fit(round, available, client_index=spec.client_index)
        except PreconditionFailed as exc:
            return self._wait_for_devices(run, spec, st, round, exc, skipped)
        token = f"{round}-{secrets.token_hex(4)}"
        selected = [d for d, _ in plan]
        started = now()
        if not self.store.fl_cas(
            job_id, {"phase": list(BETWEEN_ROUNDS), "next_round": [round]},
            phase=FLPhase.TRAINING, round=round, token=token, selected=selected, skipped=skipped,
            started_at=started, deadline=started + spec.round_timeout, waiting_since=None,
            dispatches=1,
        ):  # fmt: skip
            return "already started"
        if skipped:
            run.event(
                f"round {round}: {len(skipped)} devices sit it out",
                type=EventType.FL, round=round, skipped=skipped,
            )  # fmt: skip
        self.dispatch.fit_round(job_id, token, selected, spec.queue)
        return "started"

    def _wait_for_devices(
        self, run: JobRun, spec: FLSpec, st: JSON, round: int, exc: PreconditionFailed,
        skipped: dict[str, str],
    ) -> str:  # fmt: skip
        """Too few devices can train: wait up to ``round_timeout`` for them, then fail."""
        since = st.get("waiting_since") or now()
        if now() - since > spec.round_timeout:
            err = PreconditionFailed(
                f"{exc.message}; waited {spec.round_timeout:.0f}s (round_timeout)",
                round=round, unavailable=skipped,
            )  # fmt: skip
            self.fail_job(run, err)
            return "failed"
        if st.get("phase") != FLPhase.WAITING:
            run.event(f"round {round} waits for devices: {exc.message}", type=EventType.FL,
                      round=round, unavailable=skipped)  # fmt: skip
        self.store.fl_cas(
            run.id, {"phase": list(BETWEEN_ROUNDS), "next_round": [round]},
            phase=FLPhase.WAITING, waiting_since=since,
        )  # fmt: skip
        self.dispatch.start_round(run.id, round, spec.queue, min(2.0, spec.round_timeout))
        return "waiting"

    def _initial_params(self, run: JobRun, spec: FLSpec) -> list[np.ndarray]:
        """Round 0's global model: a built-in model's own init, or -- for a ``module:`` model,
        which is code for the devices and never runs here -- the first device in job order
        that answers ``get_parameters``. Raises PreconditionFailed with every device's reason."""
        seed = spec.strategy_params.get("seed")
        if not is_device_model(spec.model):
            return spec.load_model().init_params(int(seed or 0))
        deadline = time.time() + spec.round_timeout
        reasons: dict[str, str] = {}
        devices = {d["id"]: d for d in self.store.get_devices(spec.devices)}
        for dev_id in spec.devices:
            device = devices.get(dev_id)
            why = "the device was removed" if device is None else eligibility(device)
            if why is None and time.time() >= deadline:
                why = "not asked: round_timeout passed"
            if why is not None or device is None:
                reasons[dev_id] = str(why)
                continue
            message = get_parameters_request(
                spec.model, seed=None if seed is None else int(seed), n_classes=spec.n_classes,
                request_id=f"init:{dev_id}",
            )  # fmt: skip
            client = channels.ClientSpec(spec.python, spec.data_path(run.id, device))
            registry = channels.registry_for(self.settings, job_alive=self._job_alive, on_late=self._late_reply)
            try:
                future = channels.submit(registry.request(run.id, device, client, message, deadline - time.time()))
                reply = channels.wait(future, deadline + 1.0)
                params = parse_get_parameters_reply(reply.reply, device_id=dev_id)
            except DeviceError as exc:
                reasons[dev_id] = f"{exc.reason}: {exc.message}"
                continue
            run.event(
                f"initial parameters of {spec.model} from device {device.get('name', dev_id)} "
                f"(shapes {[list(p.shape) for p in params]}); the controller does not run the model",
                type=EventType.FL, device=dev_id,
            )  # fmt: skip
            return params
        raise PreconditionFailed(
            f"no device could give the initial parameters of {spec.model}: "
            + "; ".join(f"{d}: {r}" for d, r in reasons.items()),
            unavailable=reasons,
        )

    # ------------------------------------------------------------------ one device's training
    def fit(self, job_id: str, token: str, device_id: str, task_id: str = "") -> JSON:
        """Train round attempt *token* on one device and record the outcome (idempotent).

        Returns ``{"device", "status", "ok"}``; status is ``stored``, ``duplicate`` (already
        done), ``late`` (the round closed first), ``stale`` (a superseded attempt) or
        ``abandoned`` (another live task held the device past the deadline)."""
        base: JSON = {"device": device_id, "token": token}
        st = self.store.fl_state(job_id)
        if st is None or st.get("token") != token:
            return {**base, "status": "stale"}
        rnd = int(st["round"])
        if st.get("phase") != FLPhase.TRAINING:
            return {**base, "status": "late"}  # the round closed before this (duplicate) task ran
        lease = f"fl:{job_id}:{token}:{device_id}"
        owner = f"{self.owner}:{task_id or secrets.token_hex(4)}"
        while not self.store.acquire_lock(lease, owner, LEASE_S):
            if self.store.fl_has_outcome(job_id, token, device_id):
                return {**base, "status": "duplicate"}
            if time.time() > float(st["deadline"]) + LEASE_S:
                return {**base, "status": "abandoned"}
            time.sleep(0.05)
        try:
            if self.store.fl_has_outcome(job_id, token, device_id):
                return {**base, "status": "duplicate"}
            outcome, update, late = self._train(job_id, st, device_id, lease, owner)
            status = self.store.fl_record_outcome(job_id, token, device_id, outcome, update)
        finally:
            self.store.release_lock(lease, owner)
        for item in late:
            self.store.fl_add_late(job_id, {
                "round": _round_of(item.get("id")), "device": device_id,
                "reason": "a reply that came after its task had given up",
            })  # fmt: skip
        if status == "late" and outcome["ok"]:
            self.store.fl_add_late(
                job_id, {"round": rnd, "device": device_id, "reason": "the update came after the round closed"}
            )
        return {**base, "status": status, "ok": outcome["ok"]}

    def _train(
        self, job_id: str, st: JSON, device_id: str, lease: str, owner: str
    ) -> tuple[JSON, str | None, list[JSON]]:
        """Ask the device's client for its update: (outcome, base64 update, late replies)."""
        rnd, token, deadline = int(st["round"]), str(st["token"]), float(st["deadline"])
        started = time.time()
        spec = self._spec(job_id)
        try:
            device = self.store.get_device(device_id)
            config = spec.make_strategy().client_config(rnd, spec.client_index[device_id])
            params = self._global_params(job_id, rnd - 1)
            message = fit_request(params, config, request_id=f"{token}:{device_id}")
            client = channels.ClientSpec(spec.python, spec.data_path(job_id, device))
            timeout = deadline - time.time()
            if timeout <= 0:
                raise SSHTimeout("the round deadline passed before the device was asked", device_id=device_id)
            registry = channels.registry_for(self.settings, job_alive=self._job_alive, on_late=self._late_reply)
            future = channels.submit(registry.request(job_id, device, client, message, timeout))

            def tick() -> bool:
                self.store.refresh_lock(lease, owner, LEASE_S)
                return not JobRun(self.store, cast(Job, {"id": job_id})).cancelled()  # only its id is read

            call = channels.wait(future, deadline + 1.0, tick, interval=TICK_S)
            reply = parse_fit_reply(call.reply, device_id=device_id)
        except concurrent.futures.CancelledError:
            return ({"ok": False, "reason": "stopped", "error": "the job was stopped",
                     "seconds": time.time() - started}, None, [])  # fmt: skip
        except DeviceError as exc:
            outcome = {"ok": False, "reason": exc.reason, "error": exc.message,
                       "seconds": time.time() - started}  # fmt: skip
            return outcome, None, []
        except Exception as exc:  # noqa: BLE001 - a failure is data, never a lost round
            log.exception("training %s on %s failed", job_id, device_id)
            return ({"ok": False, "reason": "internal", "error": f"{type(exc).__name__}: {exc}",
                     "seconds": time.time() - started}, None, [])  # fmt: skip
        outcome = {
            "ok": True, "num_examples": reply.num_examples, "metrics": reply.metrics,
            "seconds": time.time() - started, "client_started": call.started, "pid": call.pid,
            "t0": started, "t1": time.time(),
        }  # fmt: skip
        return outcome, str(call.reply["params"]), call.late

    # ------------------------------------------------------------------ closing a round
    def close(self, job_id: str, token: str) -> str:
        """Aggregate round attempt *token* once every device reported or the deadline passed,
        checkpoint it, record it, start the next round (idempotent; see the module doc)."""
        st = self.store.fl_state(job_id)
        if st is None or st.get("token") != token:
            return "stale"
        if st.get("phase") not in IN_ROUND:
            return str(st.get("phase"))
        selected: list[str] = list(st["selected"])
        job = get_job(self.store, job_id)
        run = JobRun(self.store, job)
        stop = bool(job.get("cancel_requested")) or job["state"] != JobState.RUNNING
        outcomes = self.store.fl_outcomes(job_id, token)
        if not stop and len(outcomes) < len(selected) and time.time() < float(st["deadline"]):
            return "waiting"  # the tasks still running close it when they end
        lock = f"fl-close:{job_id}:{token}"
        if not self.store.acquire_lock(lock, self.owner, CLOSE_LEASE_S):
            return "busy"
        try:
            if not self.store.fl_cas(job_id, {"token": [token], "phase": list(IN_ROUND)},
                                     phase=FLPhase.CLOSING):  # fmt: skip
                return "stale"
            outcomes = self.store.fl_outcomes(job_id, token)  # final: the round takes no more
            if stop:
                cut = [d for d in selected if not (outcomes.get(d) or {}).get("ok")]
                if cut or job["state"] != JobState.RUNNING:
                    return self._discard_round(run, st, "stopped during the round")
            return self._aggregate(run, st, selected, outcomes, stop)
        finally:
            self.store.release_lock(lock, self.owner)

    def _aggregate(self, run: JobRun, st: JSON, selected: list[str], outcomes: Mapping[str, JSON], stop: bool) -> str:
        job_id, token, rnd = run.id, str(st["token"]), int(st["round"])
        spec = FLSpec.from_params(run.job["params"])
        directory = checkpoint_dir(self.settings)
        previous = load_checkpoint(directory, job_id, rnd - 1)
        strategy = spec.make_strategy()
        strategy.load_state(previous.state)
        strategy.begin_round(rnd, previous.params)
        failures: list[FitFailure] = []
        starts = 0
        for dev in selected:  # client order: the same sums as the in-process reference
            o = outcomes.get(dev)
            if o is None:
                failures.append((dev, "no result by the round deadline"))
                continue
            if not o.get("ok"):
                failures.append((dev, f"{o.get('reason')}: {o.get('error')}"))
                continue
            starts += 1 if o.get("client_started") else 0
            blob = self.store.fl_update(job_id, token, dev)
            try:
                if blob is None:
                    raise ValidationError("the update is missing")
                strategy.accumulate(dev, decode_params(blob), int(o["num_examples"]),
                                    o.get("metrics") or {})  # fmt: skip
            except (ValidationError, ValueError, OSError) as exc:
                failures.append((dev, f"invalid update: {exc}"))
        try:
            params, metrics = strategy.finish_round(failures)
        except PreconditionFailed as exc:
            if failures:  # say why, per device
                why = "; ".join(f"{d}: {reason}" for d, reason in failures)
                exc = PreconditionFailed(f"{exc.message}; failed: {why}", **{**exc.details, "failures": dict(failures)})
            self.fail_job(run, exc, st)
            return "failed"
        closed = now()
        ok = [o for o in outcomes.values() if o.get("ok") and "t0" in o]
        started = float(st["started_at"])
        timing = {  # where the round's time went: queueing, training, closing
            "first_fit_s": min(o["t0"] for o in ok) - started, "last_fit_s": max(o["t1"] for o in ok) - started,
            "slowest_fit_s": max(o["seconds"] for o in ok),
        } if ok else {}  # fmt: skip
        record: JSON = {
            "round": rnd, "participants": metrics["clients"], "num_clients": metrics["num_clients"],
            "num_examples": metrics["num_examples"], "failures": metrics["failures"],
            "selected": selected, "skipped": st.get("skipped") or {},
            "train_loss": metrics.get("train_loss"), "eval_accuracy": None, "eval_loss": None,
            "started_at": st["started_at"], "closed_at": closed,
            "duration_s": closed - float(st["started_at"]), "client_starts": starts,
            "dispatches": st.get("dispatches", 1), "timing": timing,
        }  # fmt: skip
        scores = self._evaluate(spec, params)
        if scores is not None:
            record["eval_accuracy"], record["eval_loss"] = scores["accuracy"], scores["loss"]
        save_checkpoint(directory, job_id, rnd, params, state=strategy.state(), metadata=record)
        self.store.fl_put_round(job_id, rnd, record)
        self.store.fl_cas(job_id, {"token": [token]}, phase=FLPhase.CLOSED, next_round=rnd + 1)
        self.store.fl_drop_round(job_id, token)
        self._record_metrics(job_id, record)
        run.progress(done=rnd, total=spec.rounds, round=rnd, accuracy=record["eval_accuracy"])
        acc = record["eval_accuracy"]
        run.event(
            f"round {rnd}: {record['num_clients']} of {len(selected)} devices"
            + (f", accuracy {acc:.4f}" if acc is not None else "")
            + (f", {len(record['failures'])} failed" if record["failures"] else "")
            + f" ({record['duration_s'] * 1000:.0f} ms)",
            type="fl.round", round=rnd, failures=record["failures"],
        )  # fmt: skip
        if rnd >= spec.rounds:
            self._finish(run, spec)
            return "finished"
        if stop:
            self._stop(run, f"stopped after round {rnd}")
            return "stopped"
        self.start_round(job_id, rnd + 1)
        return "closed"

    def _discard_round(self, run: JobRun, st: JSON, why: str) -> str:
        rnd = int(st["round"])
        self.store.fl_cas(run.id, {"token": [st["token"]]}, phase=FLPhase.STOPPED, next_round=rnd)
        self.store.fl_drop_round(run.id, str(st["token"]))
        self._stop(run, f"{why}: round {rnd} discarded; resume restarts it from round {rnd - 1}")
        return "stopped"

    # ------------------------------------------------------------------ recovery
    def recover(self, job_id: str | None = None) -> JSON:
        """Put lost work of running FL jobs back on the queue (all active jobs by default).

        Training rounds whose devices have neither an outcome nor a live lease are dispatched
        again with a fresh deadline (those devices never had their chance); a round whose close
        was lost is closed; a job between rounds gets its next round. Jobs with work still held
        by live tasks are checked again after the lease time."""
        ids = [job_id] if job_id else self.store.fl_active_jobs()
        out: JSON = {}
        recheck = False
        for jid in ids:
            try:
                out[jid] = action = self._recover_one(jid)
            except EVCError as exc:
                out[jid] = f"error: {exc.message}"
                continue
            recheck |= action in ("busy", "live")
        if recheck:
            queue = self._spec(job_id).queue if job_id else "fl"
            self.dispatch.recover(job_id, LEASE_S, queue)
        return out

    def _recover_one(self, job_id: str) -> str:
        job = get_job(self.store, job_id)
        st = self.store.fl_state(job_id)
        if job["state"] != JobState.RUNNING or st is None:
            self.store.fl_deactivate(job_id)
            return "inactive"
        spec = FLSpec.from_params(job["params"])
        phase, token = st.get("phase"), st.get("token")
        if phase == FLPhase.TRAINING and token:
            outcomes = self.store.fl_outcomes(job_id, token)
            missing = [d for d in st["selected"] if d not in outcomes]
            if not missing:
                self.dispatch.close_round(job_id, token, spec.queue)
                return "close"
            orphaned = [d for d in missing
                        if self.store.lock_owner(f"fl:{job_id}:{token}:{d}") is None]  # fmt: skip
            if len(orphaned) < len(missing):
                return "live"
            deadline = max(float(st["deadline"]), now() + spec.round_timeout)
            if not self.store.fl_cas(
                job_id,
                {"token": [token], "phase": [FLPhase.TRAINING]},
                deadline=deadline,
                dispatches=int(st.get("dispatches", 1)) + 1,
            ):
                return "moved on"  # fmt: skip
            JobRun(self.store, job).event(
                f"round {st['round']}: dispatched again for {len(orphaned)} devices whose "
                "training tasks were lost (a worker stopped)",
                type=EventType.FL, round=st["round"], devices=orphaned,
            )  # fmt: skip
            self.dispatch.fit_round(job_id, token, list(st["selected"]), spec.queue)
            return "redispatched"
        if phase == FLPhase.CLOSING and token:
            if self.store.lock_owner(f"fl-close:{job_id}:{token}") is not None:
                return "busy"
            self.dispatch.close_round(job_id, token, spec.queue)
            return "close"
        if phase in BETWEEN_ROUNDS:
            return self.start_round(job_id, int(st["next_round"]))
        return str(phase)

    # ------------------------------------------------------------------ endings
    def _finish(self, run: JobRun, spec: FLSpec) -> None:
        records = self.store.fl_rounds(run.id)
        last = records[-1] if records else {}
        durations = [r["duration_s"] for r in records]
        summary = {
            "rounds": len(records),
            "accuracy": last.get("eval_accuracy"),
            "loss": last.get("eval_loss"),
            "train_loss": last.get("train_loss"),
            "median_round_s": statistics.median(durations) if durations else None,
            "client_starts": sum(int(r.get("client_starts") or 0) for r in records),
        }
        self.store.fl_cas(run.id, {}, phase=FLPhase.DONE)
        self.store.fl_deactivate(run.id)
        run.succeed(summary, message=f"finished {spec.rounds} rounds")
        self._close_channels(run.id)

    def _stop(self, run: JobRun, why: str) -> None:
        self.store.fl_cas(run.id, {"phase": [*BETWEEN_ROUNDS, *IN_ROUND]},
                          phase=FLPhase.STOPPED)  # fmt: skip
        self.store.fl_deactivate(run.id)
        run.cancel({"stopped": why, "rounds": len(self.store.fl_rounds(run.id))})
        run.event(why, type=EventType.FL)
        self._close_channels(run.id)

    def fail_job(self, run: JobRun, exc: EVCError, st: JSON | None = None) -> None:
        """Fail the job with *exc*; a round in flight is discarded (resume restarts it)."""
        changes: JSON = {"phase": FLPhase.FAILED}
        if st is not None and st.get("token"):
            changes["next_round"] = int(st["round"])
            self.store.fl_drop_round(run.id, str(st["token"]))
        self.store.fl_cas(run.id, {}, **changes)
        self.store.fl_deactivate(run.id)
        run.fail(exc, {"rounds": len(self.store.fl_rounds(run.id))})
        self._close_channels(run.id)

    def _close_channels(self, job_id: str) -> None:
        """Close the job's channels in this process (other processes' reapers close theirs)."""
        for reg in channels.local_registries():
            try:
                pooling.call(reg.close_job(job_id), 5.0)
            except Exception:  # noqa: BLE001 - the reaper closes what this misses
                log.debug("closing FL channels of %s failed", job_id, exc_info=True)

    # ------------------------------------------------------------------ helpers
    def _late_reply(self, job_id: str, device_id: str, item: JSON) -> None:
        self.store.fl_add_late(job_id, {
            "round": _round_of(item.get("id")), "device": device_id,
            "reason": "the device answered after its round's deadline; the update was discarded",
        })  # fmt: skip

    def _job_alive(self, job_id: str) -> bool:
        return self.store.job_state(job_id) == JobState.RUNNING

    def _spec(self, job_id: str) -> FLSpec:
        spec = _specs.get(job_id)
        if spec is None:
            spec = FLSpec.from_params(self.store.get_job(job_id)["params"])
            _remember(_specs, job_id, spec)
        return spec

    def _global_params(self, job_id: str, round: int) -> list[np.ndarray]:
        key = (str(checkpoint_dir(self.settings)), job_id, round)
        params = _globals.get(key)
        if params is None:
            params = load_checkpoint(checkpoint_dir(self.settings), job_id, round).params
            _remember(_globals, key, params)
        return params

    def _evaluate(self, spec: FLSpec, params: Sequence[np.ndarray]) -> dict[str, Any] | None:
        if not spec.test_set or is_device_model(spec.model):
            return None  # a module model is device code: never evaluated (run) here
        try:
            X, y = load_test_set(self.settings, spec.test_set)
            return load_model(spec.model, n_features=X.shape[1], n_classes=spec.n_classes
                              ).evaluate(params, X, y)  # fmt: skip
        except (EVCError, ValueError) as exc:
            log.warning("evaluating on test set %r failed: %s", spec.test_set, exc)
            return None

    @staticmethod
    def _record_metrics(job_id: str, record: JSON) -> None:
        hook = pooling.optional_metric("record_fl_round")
        if hook is None:
            return
        try:
            hook(job_id, record["round"], record["num_clients"], record["duration_s"],
                 record["eval_accuracy"])  # fmt: skip
        except Exception:  # noqa: BLE001 - metrics never break a round
            log.debug("record_fl_round failed", exc_info=True)


# ---------------------------------------------------------------------- per-process caches
_cache_lock = threading.Lock()  # a threads-pool worker runs many round tasks per process
_specs: OrderedDict[str, FLSpec] = OrderedDict()
_globals: OrderedDict[tuple[str, str, int], list[np.ndarray]] = OrderedDict()
_test_sets: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any, size: int = 16) -> None:
    with _cache_lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)


def _round_of(request_id: object) -> int | None:
    """The round of a fit request id ``<round>-<hex>:<device>``."""
    try:
        return int(str(request_id).split("-", 1)[0])
    except ValueError:
        return None


def load_test_set(settings: Settings, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A server-side test set: ``<data_dir>/fl/test-sets/<name>.npz`` (written by the
    partition helper), or the built-in reference split ``digits``."""
    key = (str(settings.data_dir), name)
    cached = _test_sets.get(key)
    if cached is not None:
        return cached
    path = evaluation_dir(settings) / f"{name}.npz"
    if path.is_file():
        X, y = load_shard(path)
    elif name in BUILTIN_TEST_SETS:
        from evc.fl.data import load_reference_digits

        ds = load_reference_digits()
        X, y = ds.X_test, ds.y_test
    else:
        raise ConfigError(f"no test set {name!r} in {evaluation_dir(settings)}")
    _remember(_test_sets, key, (X, y), size=4)
    return X, y


__all__ = [
    "ACTIVE_PHASES",
    "LEASE_S",
    "Dispatcher",
    "FLSpec",
    "Rounds",
    "checkpoint_dir",
    "eligibility",
    "fl_ready",
    "load_test_set",
    "evaluation_dir",
]
