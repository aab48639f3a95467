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
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from evc.errors import DeviceError, EVCError, PreconditionFailed, SSHTimeout, StoreUnavailable
from evc.fl import channels
from evc.fl.aggregation import Closing
from evc.fl.checkpoint import latest_round, save_checkpoint
from evc.fl.jobspec import (
    ACTIVE_PHASES,
    BUILTIN_TEST_SETS,
    CLOSE_LEASE_S,
    DEGRADED,
    LEASE_S,
    TICK_S,
    Dispatcher,
    FLSpec,
    checkpoint_dir,
    default_owner,
    eligibility,
    evaluation_dir,
    fl_ready,
)
from evc.fl.models import is_device_model
from evc.fl.protocol import fit_request, get_parameters_request, parse_fit_reply, parse_get_parameters_reply
from evc.fl.recovery import Recovery
from evc.fl.rounds_core import _round_of, load_test_set
from evc.jobs import JobRun
from evc.jobs import get as get_job
from evc.model import BETWEEN_ROUNDS, EventType, FLPhase, FLState, Job, JobState
from evc.store import JSON, now

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the engine
@dataclass
class Rounds(Closing, Recovery):
    """Runs the rounds of FL jobs over a store, settings and a dispatcher (see module doc):
    starting rounds and training here, closing them in :class:`~evc.fl.aggregation.Closing`,
    recovery in :class:`~evc.fl.recovery.Recovery`, endings in
    :class:`~evc.fl.rounds_core.RoundsCore`."""

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
        except StoreUnavailable:
            raise  # transient: the task retries; the job is not failed for a Redis outage
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
        strategy = spec.make_strategy()
        devices = {d["id"]: d for d in self.store.get_devices(spec.devices)}
        skipped = sit_outs(spec.devices, devices, strategy.plan.min_available_clients)
        available = [d for d in spec.devices if d not in skipped]
        if not available:
            # no device can train: fail now, saying why for each device (resume retries)
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
        self, run: JobRun, spec: FLSpec, st: FLState, round: int, exc: PreconditionFailed,
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
        self, job_id: str, st: FLState, device_id: str, lease: str, owner: str
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


def sit_outs(
    job_devices: Sequence[str], devices: Mapping[str, Mapping[str, Any]], min_available: int
) -> dict[str, str]:
    """The devices that sit a round out, with the reason: removed, not eligible; degraded
    devices sit out while enough healthy ones can train, but when too few can, degraded ones
    (slow, not broken) make up the number of *min_available*, in job order. Pure."""
    skipped = {d: "the device was removed" for d in job_devices if d not in devices}
    for dev_id, dev in devices.items():
        reason = eligibility(dev)
        if reason:
            skipped[dev_id] = reason
    short = min_available - sum(1 for d in job_devices if d not in skipped)
    for dev_id in [d for d in job_devices if skipped.get(d, "").startswith(DEGRADED)][: max(0, short)]:
        del skipped[dev_id]
    return skipped


__all__ = [
    "ACTIVE_PHASES",
    "BUILTIN_TEST_SETS",
    "CLOSE_LEASE_S",
    "DEGRADED",
    "LEASE_S",
    "TICK_S",
    "Dispatcher",
    "FLSpec",
    "Rounds",
    "checkpoint_dir",
    "default_owner",
    "eligibility",
    "fl_ready",
    "load_test_set",
    "evaluation_dir",
]
