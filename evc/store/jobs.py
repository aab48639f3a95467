"""Jobs: records and their indexes, idempotent creation, state transitions, attempts and
leases, events, results, retention."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from evc.errors import Conflict, NotFound, StaleAttempt
from evc.model import JOB_STATES as JOB_STATES  # the states live once, in evc.model
from evc.model import TERMINAL_STATES as TERMINAL_STATES
from evc.model import Job
from evc.store import scripts
from evc.store._base import JOB, JSON, StoreBase, _dump, _load, now

#: a job id inside a Celery task message (its task id and arguments name it)
JOB_ID_IN_MESSAGE = re.compile(rb"job_[0-9a-f]{16}")


class JobStore(StoreBase):
    # A job's indexes, kept by the scripts that change its state: ``jobs-state:<state>`` and
    # ``jobs-ks:<kind>:<state>`` (scored by creation time) answer filtered listings without a
    # scan; ``jobs-finished`` (scored by finish time) is what retention prunes (see scripts.py).

    def claim_idempotency_key(self, key: str, job_id: str) -> Job | None:
        """Reserve *key* for *job_id*; if another job holds it, return that job.

        *key* may end with ``"\n" + fingerprint`` (a hash of the request, see
        :func:`evc.jobs.scoped_key`), kept next to the job id: the same key with another
        fingerprint is refused (409), never answered with an unrelated job."""
        name, _, fingerprint = key.partition("\n")
        ikey = self.k("idem", name)
        if self._redis.set(ikey, f"{job_id} {fingerprint}", nx=True, ex=self.settings.idempotency_ttl_s):
            return None
        existing = self._redis.get(ikey)
        for _ in range(50):  # the first creator may still be writing its job
            held, _, held_fp = (existing or b"").decode().partition(" ")
            if existing and held_fp != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was already used with a different request; "
                    "repeat the same request to get its job, or use a new key",
                    field="Idempotency-Key",
                )
            if held and self._redis.exists(self.k("job", held)):
                return self.get_job(held)
            time.sleep(0.01)
            existing = self._redis.get(ikey)
        raise Conflict("a job with this Idempotency-Key is being created; retry")

    def create_job(
        self,
        job: Job,
        idempotency_key: str | None = None,
        *,
        publish: Iterable[tuple[str, tuple[Any, ...]]] = (),
        pipe: Any = None,
    ) -> tuple[Job, bool]:
        """Store *job* and run *publish* (Redis commands that enqueue its task) in one MULTI/EXEC,
        or queue both on the caller's *pipe*. With an idempotency key already used, return that
        job instead (and publish nothing)."""
        if idempotency_key:
            existing = self.claim_idempotency_key(idempotency_key, job["id"])
            if existing is not None:
                return existing, False
        p = pipe if pipe is not None else self._redis.pipeline(transaction=True)
        # the very commands ``hset(key, mapping=...)`` and ``zadd(key, {id: score})`` queue,
        # without their option handling (the API's busiest write)
        job_id, at, kind, state, pre = job["id"], job["created_at"], job["kind"], job["state"], self.prefix
        p.execute_command("HSET", f"{pre}:job:{job_id}", *[x for kv in _dump(job).items() for x in kv])
        p.execute_command("ZADD", f"{pre}:jobs", at, job_id)
        p.execute_command("ZADD", f"{pre}:jobs-kind:{kind}", at, job_id)
        p.execute_command("ZADD", f"{pre}:jobs-state:{state}", at, job_id)
        p.execute_command("ZADD", f"{pre}:jobs-ks:{kind}:{state}", at, job_id)
        for target in dict.fromkeys(job.get("targets") or ()):
            p.execute_command("ZADD", f"{pre}:jobs-target:{target}", at, job_id)
        for name, args in publish:
            getattr(p, name)(*args)
        if pipe is None:
            p.execute()
        return job, True

    def get_job(self, job_id: str) -> Job:
        return self._get(JOB, job_id)

    def job_state(self, job_id: str) -> str | None:
        raw = self._redis.hget(self.k("job", job_id), "state")
        return json.loads(raw) if raw else None

    def update_job(self, job_id: str, *, fence: int | None = None, **changes: Any) -> None:
        """Set fields of a job; with *fence* (an attempt number), only while that attempt runs
        it (else :class:`~evc.errors.StaleAttempt`)."""
        if fence is None:
            self._redis.hset(self.k("job", job_id), mapping=_dump(changes))
            return
        args = [x for kv in _dump(changes).items() for x in kv]
        self._fenced_write(job_id, fence, self.k("job", job_id), "HSET", *args)

    def _fenced_write(self, job_id: str, attempt: int, key: str, command: str, *args: Any) -> Any:
        ok, reply = self._script(scripts.FENCED)(
            keys=[self.k("job", job_id), key], args=[self.prefix, job_id, attempt, command, *args]
        )
        if not ok:
            raise StaleAttempt(f"attempt {attempt} of job {job_id} no longer runs it", job_id=job_id)
        return reply

    def transition_job(
        self,
        job_id: str,
        state: str,
        allowed_from: Iterable[str],
        *,
        fence: int | None = None,
        event: JSON | None = None,
        **changes: Any,
    ) -> bool:
        """Atomically move a job to *state* if it is in one of *allowed_from* (and, with
        *fence* (an attempt number), only while that attempt runs it, else
        :class:`~evc.errors.StaleAttempt`), keeping its indexes and appending *event* in the
        same step."""
        args: list[Any] = [
            json.dumps(state), json.dumps(list(allowed_from)), self.prefix, job_id,
            "" if fence is None else fence, json.dumps(event) if event else "",
        ]  # fmt: skip
        for k, v in _dump(changes).items():
            args += [k, v]
        prev = self._script(scripts.TRANSITION)(keys=[self.k("job", job_id)], args=args)
        if prev is None:
            raise NotFound(f"job {job_id} not found", id=job_id)
        if prev == b"stale":
            raise StaleAttempt(f"attempt {fence} of job {job_id} no longer runs it", job_id=job_id)
        return json.loads(prev) in set(allowed_from)

    def start_job(self, job_id: str, lease_s: float, max_lost: int) -> tuple[str, int, int]:
        """Begin an execution: ``(what, attempt, lost)``, what is ``started`` (with a new
        attempt number and a lease it owns), ``busy`` (a live attempt runs the job), ``final``
        or ``lost`` (its workers were lost *max_lost* times: the job is now failed)."""
        what, attempt, lost = self._script(scripts.START)(
            keys=[self.k("job", job_id)],
            args=[self.prefix, job_id, int(lease_s * 1000), max_lost, json.dumps(now())],
        )
        return what.decode(), int(attempt), int(lost)

    def requeue_lost_job(self, job_id: str, max_lost: int) -> tuple[str, int, int]:
        """Re-queue (or fail, past *max_lost*) a running job whose lease expired on Redis's
        clock: ``(what, attempt, lost)``, what is ``requeued``, ``failed`` or ``skipped``."""
        what, attempt, lost = self._script(scripts.LOST)(
            keys=[self.k("job", job_id)], args=[self.prefix, job_id, max_lost, json.dumps(now())]
        )
        return what.decode(), int(attempt), int(lost)

    def claim_job_effect(self, job_id: str, effect: str, attempt: int | None) -> bool:
        """True the first time *effect* of the job is claimed (by a live attempt when given)."""
        key = self.k("job", job_id, "effects")
        if attempt is None:
            return bool(self._redis.hsetnx(key, effect, json.dumps(None)))
        return bool(self._fenced_write(job_id, attempt, key, "HSETNX", effect, json.dumps(attempt)))

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the lease of (job, attempt); False when that attempt is stale."""
        return bool(
            self._script(scripts.RENEW)(
                keys=[self.k("job", job_id)], args=[self.prefix, job_id, attempt, int(lease_s * 1000)]
            )
        )

    def list_jobs(
        self,
        offset: int = 0,
        limit: int = 50,
        kind: str | None = None,
        state: str | None = None,
        target: str | None = None,
    ) -> tuple[list[Job], int]:
        """Jobs newest first, filtered by kind, state and target through their indexes."""
        if target is None:
            if kind and state:
                key = self.k("jobs-ks", kind, state)
            elif kind or state:
                key = self.k("jobs-kind", kind) if kind else self.k("jobs-state", state or "")
            else:
                key = self.k("jobs")
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
            return self._get_many(JOB, (i.decode() for i in ids)), int(total)
        # one device's jobs: walk its index, reading only kind and state to filter
        key = self.k("jobs-target", target)
        if not (kind or state):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(key)
            pipe.zrevrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
            return self._get_many(JOB, (i.decode() for i in ids)), int(total)
        found = self._script(scripts.WALK_TARGET)(
            keys=[key],
            args=[self.prefix, json.dumps(kind) if kind else "", json.dumps(state) if state else "", offset, limit],
        )
        return self._get_many(JOB, (i.decode() for i in found[1:])), int(found[0])

    def waiting_jobs(self, older_than_s: float, limit: int = 1000) -> list[JSON]:
        """Queued jobs (oldest first, at most *limit*) that have waited *older_than_s* past
        their queueing (or their countdown): ``id``, ``kind``, ``attempt`` of each."""
        ids = [i.decode() for i in self._redis.zrange(self.k("jobs-state", "queued"), 0, limit - 1)]
        pipe = self._redis.pipeline(transaction=False)
        names = ["id", "kind", "attempt", "state", "queued_at", "not_before", "created_at"]
        for i in ids:
            pipe.hmget(self.k("job", i), names)
        cutoff, out = now() - older_than_s, []
        for values in pipe.execute():
            if values[0] is None:
                continue
            rec = {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}
            since = max(float(rec.get(f) or 0) for f in ("queued_at", "not_before", "created_at"))
            if rec.get("state") == "queued" and since <= cutoff:
                out.append(rec)
        return out

    def jobs_in_queue(self, queue: str, max_scan: int = 100_000) -> set[str] | None:
        """Ids of the jobs whose task messages wait in Celery *queue* (None when the queue is
        longer than *max_scan*: too long to read)."""
        if int(self._redis.llen(queue)) > max_scan:
            return None
        found: set[str] = set()
        start = 0
        while True:
            chunk = self._redis.lrange(queue, start, start + 999)
            for raw in chunk:
                found.update(m.decode() for m in JOB_ID_IN_MESSAGE.findall(raw))
            if len(chunk) < 1000:
                return found
            start += 1000

    def index_old_jobs(self, batch: int = 1000) -> int:
        """Add jobs stored before the state/target/finished indexes existed to them (once: a
        marker key records that it ran). Returns how many jobs were read."""
        marker = self.k("index-version", "jobs")
        if self._redis.exists(marker):
            return 0
        seen, start = 0, 0
        names = ["id", "kind", "state", "targets", "created_at", "finished_at"]
        while True:
            ids = [i.decode() for i in self._redis.zrange(self.k("jobs"), start, start + batch - 1)]
            if not ids:
                break
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k("job", i), names)
            rows = pipe.execute()
            pipe = self._redis.pipeline(transaction=False)
            for values in rows:
                if values[0] is None:
                    continue
                rec = {n: json.loads(v) for n, v in zip(names, values, strict=True) if v is not None}
                jid, score = rec["id"], float(rec.get("created_at") or 0)
                pipe.zadd(self.k("jobs-state", rec["state"]), {jid: score})
                pipe.zadd(self.k("jobs-ks", rec["kind"], rec["state"]), {jid: score})
                for t in rec.get("targets") or []:
                    pipe.zadd(self.k("jobs-target", t), {jid: score})
                if rec["state"] in TERMINAL_STATES:
                    pipe.zadd(self.k("jobs-finished"), {jid: float(rec.get("finished_at") or score) * 1000})
            pipe.execute()
            seen += len(ids)
            start += batch
        self._redis.set(marker, json.dumps(now()))
        return seen

    def prune_jobs(self, older_than_s: float, batch: int = 500) -> int:
        """Delete jobs finished more than *older_than_s* ago (on Redis's clock) with their
        events, results, FL records and index entries. Returns how many went."""
        self.index_old_jobs()
        sec, usec = self._redis.time()
        cutoff = (int(sec) - older_than_s) * 1000 + int(usec) // 1000
        deleted = 0
        while True:
            ids = [i.decode() for i in self._redis.zrangebyscore(self.k("jobs-finished"), "-inf", cutoff, 0, batch)]
            if not ids:
                return deleted
            pipe = self._redis.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k("job", i), ["kind", "state", "targets"])
            metas = pipe.execute()
            pipe = self._redis.pipeline(transaction=True)
            for i, (kind, state, targets) in zip(ids, metas, strict=True):
                kind = json.loads(kind) if kind else ""
                state = json.loads(state) if state else ""
                pipe.delete(
                    self.k("job", i), self.k("job", i, "events"), self.k("job", i, "results"),
                    self.k("job", i, "effects"), self.k("fl", i), self.k("fl", i, "rounds"), self.k("fl", i, "late"),
                )  # fmt: skip
                pipe.zrem(self.k("jobs"), i)
                pipe.zrem(self.k("jobs-finished"), i)
                pipe.zrem(self.k("jobs-kind", kind), i)
                pipe.zrem(self.k("jobs-state", state), i)
                pipe.zrem(self.k("jobs-ks", kind, state), i)
                pipe.srem(self.k("fl", "active"), i)
                for t in json.loads(targets) if targets else []:
                    pipe.zrem(self.k("jobs-target", t), i)
            pipe.execute()
            deleted += len(ids)

    # a lease per job whose task body is executing, owned by its attempt and judged on Redis's
    # clock: the worker renews it; the reaper re-queues jobs whose lease expired
    def release_lease(self, job_id: str) -> None:
        self._redis.zrem(self.k("job-leases"), job_id)

    def expired_leases(self) -> list[str]:
        return [j.decode() for j in self._script(scripts.EXPIRED)(keys=[self.k("job-leases")])]

    def add_event(self, job_id: str, event: JSON, *, fence: int | None = None) -> int:
        return self.add_events(job_id, [event], fence=fence)

    def add_events(self, job_id: str, events: list[JSON], *, fence: int | None = None) -> int:
        key = self.k("job", job_id, "events")
        if not events:
            return int(self._redis.llen(key))
        t = now()
        raw = [json.dumps({"ts": t, **e}) for e in events]
        if fence is not None:
            return int(self._fenced_write(job_id, fence, key, "RPUSH", *raw))
        return int(self._redis.rpush(key, *raw))

    def events(self, job_id: str, after: int = 0, limit: int = 100) -> list[JSON]:
        raw = self._redis.lrange(self.k("job", job_id, "events"), after, after + limit - 1)
        return [{"seq": after + i + 1, **json.loads(e)} for i, e in enumerate(raw)]

    def event_count(self, job_id: str) -> int:
        return int(self._redis.llen(self.k("job", job_id, "events")))

    def set_result(self, job_id: str, target: str, result: JSON, *, fence: int | None = None) -> bool:
        """Record a target's result; True when the target had none yet (a retry overwrites).
        With *fence*, only while that attempt runs the job (else StaleAttempt)."""
        key = self.k("job", job_id, "results")
        if fence is not None:
            return bool(self._fenced_write(job_id, fence, key, "HSET", target, json.dumps(result)))
        return bool(self._redis.hset(key, target, json.dumps(result)))

    def results(self, job_id: str) -> JSON:
        return _load(self._redis.hgetall(self.k("job", job_id, "results")))
