"""Closing a round of an FL job: fold the updates in client order, evaluate, checkpoint,
record, start the next round (part of :class:`evc.fl.orchestrator.Rounds`)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from evc.errors import PreconditionFailed, ValidationError
from evc.fl.checkpoint import load_checkpoint, save_checkpoint
from evc.fl.jobspec import CLOSE_LEASE_S, FLSpec, checkpoint_dir
from evc.fl.protocol import decode_params
from evc.fl.rounds_core import RoundsCore
from evc.fl.strategy import FitFailure, Strategy
from evc.jobs import JobRun
from evc.jobs import get as get_job
from evc.model import IN_ROUND, FLPhase, FLState, JobState
from evc.store import JSON, now


class Closing(RoundsCore):
    """Round closing: :meth:`close` (see :mod:`evc.fl.orchestrator`)."""

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

    def _aggregate(
        self, run: JobRun, st: FLState, selected: list[str], outcomes: Mapping[str, JSON], stop: bool
    ) -> str:
        job_id, token, rnd = run.id, str(st["token"]), int(st["round"])
        spec = FLSpec.from_params(run.job["params"])
        directory = checkpoint_dir(self.settings)
        previous = load_checkpoint(directory, job_id, rnd - 1)
        strategy = spec.make_strategy()
        strategy.load_state(previous.state)
        strategy.begin_round(rnd, previous.params)
        failures, starts = self._fold(strategy, job_id, token, selected, outcomes)
        try:
            params, metrics = strategy.finish_round(failures)
        except PreconditionFailed as exc:
            if failures:  # say why, per device
                why = "; ".join(f"{d}: {reason}" for d, reason in failures)
                exc = PreconditionFailed(f"{exc.message}; failed: {why}", **{**exc.details, "failures": dict(failures)})
            self.fail_job(run, exc, st)
            return "failed"
        record = round_record(st, selected, outcomes, metrics, starts, now())
        scores = self._evaluate(spec, params)
        if scores is not None:
            record["eval_accuracy"], record["eval_loss"] = scores["accuracy"], scores["loss"]
        save_checkpoint(directory, job_id, rnd, params, state=strategy.state(), metadata=record)
        self.store.fl_put_round(job_id, rnd, record)
        self.store.fl_cas(job_id, {"token": [token]}, phase=FLPhase.CLOSED, next_round=rnd + 1)
        self.store.fl_drop_round(job_id, token)
        self._record_metrics(job_id, record)
        run.progress(done=rnd, total=spec.rounds, round=rnd, accuracy=record["eval_accuracy"])
        run.event(round_message(record, len(selected)), type="fl.round", round=rnd, failures=record["failures"])
        if rnd >= spec.rounds:
            self._finish(run, spec)
            return "finished"
        if stop:
            self._stop(run, f"stopped after round {rnd}")
            return "stopped"
        self.start_round(job_id, rnd + 1)
        return "closed"

    def _fold(
        self, strategy: Strategy, job_id: str, token: str, selected: list[str], outcomes: Mapping[str, JSON]
    ) -> tuple[list[FitFailure], int]:
        """Fold each selected device's update into *strategy*, one at a time in client order
        (the same sums as the in-process reference). Returns (the failures, how many devices'
        clients had to be started)."""
        failures: list[FitFailure] = []
        starts = 0
        for dev in selected:
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
        return failures, starts

    def _discard_round(self, run: JobRun, st: FLState, why: str) -> str:
        rnd = int(st["round"])
        self.store.fl_cas(run.id, {"token": [st["token"]]}, phase=FLPhase.STOPPED, next_round=rnd)
        self.store.fl_drop_round(run.id, str(st["token"]))
        self._stop(run, f"{why}: round {rnd} discarded; resume restarts it from round {rnd - 1}")
        return "stopped"


def round_record(
    st: FLState, selected: list[str], outcomes: Mapping[str, JSON], metrics: JSON, starts: int, closed: float
) -> JSON:
    """A closed round's record (before evaluation): who took part, the strategy's metrics,
    and where the round's time went (queueing, training, closing). Pure."""
    ok = [o for o in outcomes.values() if o.get("ok") and "t0" in o]
    started = float(st["started_at"])
    timing = {
        "first_fit_s": min(o["t0"] for o in ok) - started, "last_fit_s": max(o["t1"] for o in ok) - started,
        "slowest_fit_s": max(o["seconds"] for o in ok),
    } if ok else {}  # fmt: skip
    return {
        "round": int(st["round"]), "participants": metrics["clients"], "num_clients": metrics["num_clients"],
        "num_examples": metrics["num_examples"], "failures": metrics["failures"],
        "selected": selected, "skipped": st.get("skipped") or {},
        "train_loss": metrics.get("train_loss"), "eval_accuracy": None, "eval_loss": None,
        "started_at": st["started_at"], "closed_at": closed,
        "duration_s": closed - float(st["started_at"]), "client_starts": starts,
        "dispatches": st.get("dispatches", 1), "timing": timing,
    }  # fmt: skip


def round_message(record: JSON, n_selected: int) -> str:
    """The job event's line for a closed round."""
    acc = record["eval_accuracy"]
    return (
        f"round {record['round']}: {record['num_clients']} of {n_selected} devices"
        + (f", accuracy {acc:.4f}" if acc is not None else "")
        + (f", {len(record['failures'])} failed" if record["failures"] else "")
        + f" ({record['duration_s'] * 1000:.0f} ms)"
    )
