"""Recovering lost work of FL jobs: rounds whose tasks a stopped worker lost are dispatched
again, lost closes and round starts redone (part of :class:`evc.fl.orchestrator.Rounds`)."""

from __future__ import annotations

from evc.errors import EVCError, StoreUnavailable
from evc.fl.jobspec import LEASE_S, FLSpec
from evc.fl.rounds_core import RoundsCore
from evc.jobs import JobRun
from evc.jobs import get as get_job
from evc.model import BETWEEN_ROUNDS, EventType, FLPhase, JobState
from evc.store import JSON, now


class Recovery(RoundsCore):
    """Recovery: :meth:`recover` (see :mod:`evc.fl.orchestrator`)."""

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
            except StoreUnavailable:
                raise  # transient: the recover task retries
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
