"""Provisioning as EVC jobs: submit, run (gate, lock, run, retry, record), relaunch failed hosts."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evc import monitoring
from evc.context import Context
from evc.errors import Conflict, EVCError, PreconditionFailed, ValidationError
from evc.fl.jobspec import record_fl_client
from evc.jobs import JobRun
from evc.model import JSON, TERMINAL_STATES, Device, HostStatus, Job, JobKindName, strings
from evc.provisioning.catalog import Catalog, PlaybookSpec
from evc.provisioning.inventory import job_inventory
from evc.provisioning.locks import LOCK_TTL_S, DeviceLocks
from evc.provisioning.params import secret_names
from evc.provisioning.request import (
    MAX_RETRIES,
    RETRYABLE,
    RUNNABLE_STATES,
    ProvisionRequest,
    RetryPolicy,
    artifact_root,
    gate,
    refusal,
    resolve_artifacts,
    resolve_targets,
)
from evc.provisioning.runner import HostResult, PlaybookRun, RunOutcome, run_playbook
from evc.settings import Settings
from evc.store import Store, new_id, now
from evc.vault import MASK, Vault

log = logging.getLogger(__name__)

SECRET_TTL_S = 7 * 86400

#: what EVC records after a playbook succeeded on a device (not in check mode), by playbook:
#: (store, device id, the run's validated variables); the exporter marks the device monitored,
#: fl-client marks it ready for federated learning
ON_SUCCESS: dict[str, Callable[[Store, str, JSON], None]] = {
    "exporter": monitoring.record_exporter,
    "fl-client": record_fl_client,  # the device can train (and holds the plug-in, if one was shipped)
}

#: what EVC adds to a playbook's validated variables in the worker, before the run, by playbook:
#: the exporter in mode container gets the controller's archive of an image devices cannot pull
BEFORE_RUN: dict[str, Callable[[Settings, JSON], JSON]] = {
    "exporter": monitoring.exporter_image_archive,
}


class ProvisionFailed(EVCError):
    """Some hosts failed, were unreachable or were refused; the job's results say which."""

    code = "provision_failed"


# ------------------------------------------------------------------------------- submitting
def submit_provision(ctx: Context, req: ProvisionRequest, secret_ref: str | None = None) -> tuple[Job, bool]:
    """Validate *req* and enqueue a provision job. Refuses up front (nothing enqueued) when the
    playbook or its variables are invalid (422), a device is unknown (404), every device is
    refused (409 precondition), or ``lock: fail`` and a device is locked by another job (409)."""
    store, settings = ctx.store, ctx.settings
    spec = Catalog.from_settings(settings).get(req.playbook)
    # a retry keeps the first job's sealed secrets (shown masked): never opened outside a worker
    kept = [n for n in secret_names(spec.schema) if secret_ref and (req.extra_vars or {}).get(n) == MASK]
    values = _validate(spec, req.extra_vars, kept)
    resolve_artifacts(spec, values, settings)
    if req.check and not spec.check_mode:
        raise ValidationError(f"playbook {spec.name!r} does not support check mode", field="check")
    ids = resolve_targets(store, req.targets, req.selector)
    _refuse_up_front(store, spec, req, ids)
    secrets = {n: values[n] for n in secret_names(spec.schema) if values.get(n) and n not in kept}
    secret_ref = _seal_secrets(store, settings, req, secrets, kept, secret_ref)
    values = {**values, **dict.fromkeys([*secrets, *kept], MASK)}
    params: JSON = {
        "playbook": spec.name,
        "extra_vars": values,
        "check": req.check,
        "forks": req.forks or settings.ansible_forks,
        "lock": req.lock,
        "lock_timeout_s": req.lock_timeout_s,
        "retry": req.retry.to_dict(),
        "selector": req.selector,
        "secret_ref": secret_ref if secrets or kept else None,
        "retry_of": req.retry_of,
    }
    job, created = ctx.submit(JobKindName.PROVISION, params=params, targets=ids)
    if created and req.retry_of:
        store.update_job(job["id"], retry_of=req.retry_of)
        job["retry_of"] = req.retry_of
    return job, created


def _refuse_up_front(store: Store, spec: PlaybookSpec, req: ProvisionRequest, ids: list[str]) -> None:
    """Refuse the job (nothing enqueued) when every device is refused, or with ``lock: fail``
    when a runnable device is locked by another job."""
    devices = store.get_devices(ids)
    refused = gate(spec, devices)
    if len(refused) == len(ids):
        raise PreconditionFailed(
            f"no target can run playbook {spec.name!r}: " + "; ".join(f"{d}: {m}" for d, (_, m) in refused.items()),
            refused={d: {"reason": r, "message": m} for d, (r, m) in refused.items()},
        )
    if req.lock == "fail":
        locks = DeviceLocks(store, "")
        held = {d: h for d in ids if d not in refused and (h := locks.holder(d))}
        if held:
            raise Conflict(
                "devices are locked by other jobs: " + ", ".join(f"{d} by {h}" for d, h in held.items()),
                locked=held,
            )


def _seal_secrets(
    store: Store, settings: Settings, req: ProvisionRequest, secrets: JSON, kept: Sequence[str], secret_ref: str | None
) -> str | None:
    """Where the job's secret values lie sealed: a retry's *kept* ones under its *secret_ref*
    (kept a while longer, never opened here), else new *secrets* sealed under a new ref."""
    if kept:
        sealed = store.get_json(f"provision-secret:{secret_ref}")
        if sealed is None:
            raise PreconditionFailed(f"job {req.retry_of}'s secret parameters expired; submit it anew")
        store.put_json(f"provision-secret:{secret_ref}", sealed, ttl_s=SECRET_TTL_S)
    elif secrets:
        secret_ref = new_id("sec")
        sealed = Vault.from_settings(settings).seal(secrets)
        store.put_json(f"provision-secret:{secret_ref}", sealed, ttl_s=SECRET_TTL_S)
    return secret_ref


def retry_job(ctx: Context, job_id: str, on: Sequence[str] = RETRYABLE) -> tuple[Job, bool]:
    """A new job that re-runs *job_id*'s playbook on its failed and unreachable hosts only."""
    store = ctx.store
    job = store.get_job(job_id)
    if job.get("kind") != JobKindName.PROVISION:
        raise Conflict(f"job {job_id} is a {job.get('kind')} job; only provision jobs are retried")
    if job["state"] not in TERMINAL_STATES:
        raise Conflict(f"job {job_id} is still {job['state']}", state=job["state"])
    results = store.results(job_id)
    hosts = [t for t in job.get("targets", []) if (results.get(t) or {}).get("status") in on]
    if not hosts:
        raise Conflict(f"job {job_id} has no {' or '.join(on)} hosts to retry")
    p = job.get("params") or {}
    extra = dict(p.get("extra_vars") or {})  # secrets stay masked and sealed under the job's secret_ref
    ref = p.get("secret_ref")
    req = ProvisionRequest(
        playbook=p["playbook"],
        targets=tuple(hosts),
        extra_vars=extra,
        check=bool(p.get("check")),
        forks=p.get("forks"),
        lock=p.get("lock", "wait"),
        lock_timeout_s=float(p.get("lock_timeout_s") or 300.0),
        retry=RetryPolicy.from_dict(p.get("retry")),
        retry_of=job_id,
    )
    return submit_provision(ctx, req, ref)


def _validate(spec: PlaybookSpec, extra_vars: Mapping[str, Any] | None, kept: Sequence[str]) -> JSON:
    """*extra_vars* checked against the playbook's schema; the secrets in *kept* are already
    sealed (a retry) and were checked when first submitted."""
    if not kept:
        return spec.validate(extra_vars)
    schema = {**spec.schema, "required": [r for r in spec.schema.get("required") or [] if r not in kept]}
    values = {k: v for k, v in (extra_vars or {}).items() if k not in kept}
    return PlaybookSpec(spec.name, spec.path, spec.description, schema=schema).validate(values)


# ------------------------------------------------------------------------------- running
def _secrets(store: Store, settings: Settings, params: Mapping[str, Any]) -> JSON:
    """The job's secret variables in clear: only a worker building the Ansible variables calls this."""
    ref = params.get("secret_ref")
    if not ref:
        return {}
    sealed = store.get_json(f"provision-secret:{ref}")
    if sealed is None:
        raise PreconditionFailed("the job's secret parameters expired before it ran")
    return dict(Vault.from_settings(settings).open(sealed))


def host_result(hr: HostResult | None, check: bool, outcome: RunOutcome) -> JSON:
    """One target's result from its run summary."""
    if hr is None:
        status = HostStatus.CANCELLED if outcome.cancelled else HostStatus.FAILED
        msg = (
            "cancelled before the host ran"
            if outcome.cancelled
            else (
                f"ansible ended ({outcome.status}, rc {outcome.rc}) without a result for this host"
                + (f": {outcome.error}" if outcome.error else "")
            )
        )
        return {"status": status, "message": msg}
    res: JSON = {"status": hr.status, **hr.counts()}
    if hr.message:
        res["message"] = hr.message
    if hr.status == HostStatus.OK and not outcome.completed:  # stopped before the host finished
        if outcome.cancelled:
            res["status"] = HostStatus.CANCELLED
        else:
            res["status"] = HostStatus.FAILED
            res["message"] = f"ansible ended ({outcome.status}) before this host finished" + (
                f": {outcome.error}" if outcome.error else ""
            )
    if check:
        res["drift"] = hr.changed_tasks
        res["in_sync"] = not hr.changed_tasks and hr.status == HostStatus.OK
    else:
        res["changed_tasks"] = [c["task"] for c in hr.changed_tasks]
    return res


def _record_facts(store: Store, device_id: str, facts: JSON) -> None:
    from evc.registration import CAPABILITIES, parse_facts

    if "probe" in facts:
        facts = parse_facts(str(facts["probe"]))
    privilege = facts.pop("privilege", None)
    changes: JSON = {"facts": facts, "last_seen": now()}
    if privilege in CAPABILITIES:
        changes.update(privilege=privilege, capabilities=CAPABILITIES[privilege])
    store.update_device(device_id, **changes)


def _internal_vars(settings: Settings) -> JSON:
    from evc.registration import PROBE

    pub = settings.key_path.with_suffix(".pub")
    return {
        "evc_public_key": pub.read_text().strip() if pub.is_file() else "",
        "evc_probe": PROBE,
        # EVC's edge exporter as one zip application, for the exporter playbook
        "evc_exporter_bundle": str(monitoring.exporter_bundle(settings.data_dir / "cache")),
        "evc_exporter_bundle_client": True,  # the bundle carries prometheus_client
        # simulated devices: system paths staged under <evc_sysroot>/<device id> (settings.device_sysroot)
        **({"evc_sysroot": settings.device_sysroot} if settings.device_sysroot else {}),
    }


def provision(store: Store, settings: Settings, run: JobRun, *, internal_vars: Mapping[str, Any] | None = None) -> JSON:
    """The provision job: refuse what cannot run, lock, run (with retries), record.

    Decides the job's end itself: it fails the job (with the summary) when any target failed,
    was unreachable or was refused; it returns the summary otherwise (and when cancelled).
    *internal_vars* adds ``evc_*`` variables (tests stage system paths with ``evc_sysroot``)."""
    p = run.params
    spec = Catalog.from_settings(settings).get(str(p.get("playbook")))
    targets: list[str] = list(run.job.get("targets") or [])
    _, summary, cancelled = run_spec(
        store, settings, run, spec, targets, {**(p.get("extra_vars") or {}), **_secrets(store, settings, p)},
        check=bool(p.get("check")), forks=int(p.get("forks") or settings.ansible_forks),
        lock=str(p.get("lock", "wait")), lock_timeout_s=float(p.get("lock_timeout_s") or 300.0),
        policy=RetryPolicy.from_dict(p.get("retry")), internal_vars=internal_vars,
    )  # fmt: skip
    if cancelled:
        return summary
    hosts = summary["hosts"]
    bad = {k: hosts[k] for k in strings(HostStatus.FAILED, HostStatus.UNREACHABLE, HostStatus.REFUSED) if hosts[k]}
    if bad:
        what = ", ".join(f"{n} {k}" for k, n in bad.items())
        run.fail(ProvisionFailed(f"{spec.name}: {what} of {len(targets)} device(s)"), summary)
    return summary


def run_spec(
    store: Store,
    settings: Settings,
    run: JobRun,
    spec: PlaybookSpec,
    targets: list[str],
    extra_vars: Mapping[str, Any],
    *,
    check: bool = False,
    forks: int | None = None,
    lock: str = "wait",
    lock_timeout_s: float = 300.0,
    policy: RetryPolicy | None = None,
    internal_vars: Mapping[str, Any] | None = None,
    report: bool = True,
    step: int | None = None,
) -> tuple[dict[str, JSON], JSON, bool]:
    """Run one playbook on *targets* inside *run*: refuse what cannot run, lock, run (with
    retries), record facts and per-playbook effects. Returns (per-target results, summary,
    cancelled). With *report* False the job's per-target results and progress are left to the
    caller (the level job reports levels, not playbooks); *step* numbers the playbook runs of
    such a job, so each gets its own ansible-runner ident."""
    internal = {**_internal_vars(settings), **(internal_vars or {})}
    values = resolve_artifacts(spec, spec.validate(dict(extra_vars)), settings)
    if spec.name in BEFORE_RUN:
        values = BEFORE_RUN[spec.name](settings, values)
    sr = _SpecRun(store, settings, run, spec, targets, values, check=check, report=report, step=step)
    started = time.monotonic()
    sr.refuse_unfit()
    locks = DeviceLocks(store, run.owner, LOCK_TTL_S)
    try:
        with locks.kept_alive():  # refreshed while waiting for the rest, too
            runnable = sr.lock(locks, sr.runnable(), lock == "wait", lock_timeout_s)
            sr.attempts_loop(runnable, policy or RetryPolicy(), int(forks or settings.ansible_forks), internal)
    finally:
        locks.release()
    return sr.finish(time.monotonic() - started)


def ansible_ident(job_id: str, attempt: int, step: int | None = None, playbook: str = "") -> str:
    """The ansible-runner ident of one playbook run: the job's id, then the attempt (from the
    second on), then, for a job running several playbooks, the step and the playbook.
    Deterministic (no clock): the same job, attempt and step give the same ident."""
    ident = job_id if attempt == 1 else f"{job_id}-{attempt}"
    if step is not None:  # several playbooks share this job: keep ansible-runner's dirs apart
        ident = f"{ident}-s{step}-{playbook}"
    return ident


class _SpecRun:
    """One :func:`run_spec`: its per-target results and how it reports them, step by step."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        run: JobRun,
        spec: PlaybookSpec,
        targets: list[str],
        values: JSON,
        *,
        check: bool,
        report: bool,
        step: int | None,
    ) -> None:
        self.store, self.settings, self.run, self.spec = store, settings, run, spec
        self.targets, self.values, self.check, self.report = targets, values, check, report
        self.step = step
        self.secret_values = [str(values[n]) for n in secret_names(spec.schema) if values.get(n)]
        self.devices = {d["id"]: d for d in store.get_devices(targets)}
        self.results: dict[str, JSON] = {}
        self.outcome: RunOutcome | None = None
        self.attempts = 0

    def record(self, dev_id: str, res: JSON) -> None:
        self.results[dev_id] = res
        if self.report:
            self.run.result(dev_id, res, count=False)

    def progress(self, done: int) -> None:
        if self.report:
            self.run.progress(done, len(self.targets))

    def refuse(self, dev_id: str, reason: str, message: str) -> None:
        self.record(dev_id, {"status": HostStatus.REFUSED, "reason": reason, "message": message})
        self.run.event(f"{dev_id} refused: {message}", type="provision", target=dev_id, reason=reason)

    def runnable(self) -> list[str]:
        return [t for t in self.targets if t not in self.results]

    def refuse_unfit(self) -> None:
        """Refuse the targets no longer registered and those the playbook's gate turns away."""
        for t in self.targets:
            if t not in self.devices:
                self.refuse(t, "not_found", "the device is no longer registered")
        for dev_id, (reason, message) in gate(self.spec, self.devices.values()).items():
            self.refuse(dev_id, reason, message)
        self.progress(len(self.results))

    def lock(self, locks: DeviceLocks, runnable: list[str], wait: bool, lock_timeout_s: float) -> list[str]:
        """Lock *runnable* (waiting for other jobs' locks when *wait*); refuse what stays locked."""
        if not runnable:
            return runnable
        run = self.run
        locked_out = locks.acquire(
            runnable,
            wait=wait,
            timeout_s=min(lock_timeout_s, self.settings.task_soft_time_limit_s / 2),
            cancelled=run.cancelled,
            on_wait=lambda d, h: run.event(f"waiting for job {h} to release {d}", type="provision", target=d),
        )
        for dev_id, why in locked_out.items():
            self.refuse(dev_id, "locked", why)
        return self.runnable()

    def attempts_loop(self, pending: list[str], policy: RetryPolicy, forks: int, internal: JSON) -> None:
        """Run the playbook on *pending*, again on the hosts that failed as *policy* says."""
        run, spec = self.run, self.spec
        while pending and not run.cancelled():
            self.attempts += 1
            run.event(
                f"running {spec.name} on {len(pending)} device(s)"
                + (" in check mode" if self.check else "")
                + (f" (attempt {self.attempts} of {policy.max + 1})" if policy.max else ""),
                type="provision", attempt=self.attempts,
            )  # fmt: skip
            ident = ansible_ident(run.id, self.attempts, self.step, spec.name)
            outcome = self.outcome = _run_once(
                self.settings, run, spec, self.values, [self.devices[d] for d in pending], ident,
                self.check, forks, self.secret_values, internal,
            )  # fmt: skip
            for dev_id in pending:
                self.record_host(dev_id, outcome)
            self.progress(sum(1 for r in self.results.values() if r["status"] not in policy.on))
            if outcome.cancelled:
                break
            pending = [d for d in pending if self.results[d]["status"] in policy.on]
            if not pending or self.attempts > policy.max:
                break
            run.event(
                f"retrying {len(pending)} device(s) in {policy.delay_s:.0f}s",
                type="retry", attempt=self.attempts + 1, targets=pending,
            )  # fmt: skip
            _sleep(policy.delay_s, run)

    def record_host(self, dev_id: str, outcome: RunOutcome) -> None:
        """One host's result of an attempt, its facts, and the playbook's effect on success."""
        hr = outcome.hosts.get(dev_id)
        res = host_result(hr, self.check, outcome)
        if res["status"] == HostStatus.UNREACHABLE and self.devices[dev_id].get("jump_host"):
            res.update(_jump_diagnosis(self.settings, self.devices[dev_id]))
        res["attempts"] = self.attempts
        self.record(dev_id, res)
        if hr is not None and hr.facts and not self.check and hr.status == HostStatus.OK:
            _record_facts(self.store, dev_id, dict(hr.facts))
        if res["status"] == HostStatus.OK and not self.check and self.spec.name in ON_SUCCESS:
            ON_SUCCESS[self.spec.name](self.store, dev_id, self.values)

    def finish(self, duration_s: float) -> tuple[dict[str, JSON], JSON, bool]:
        """Mark what never ran cancelled; (results, summary, cancelled)."""
        cancelled = self.run.cancelled() or (self.outcome is not None and self.outcome.cancelled)
        for t in self.runnable():
            self.record(t, {"status": "cancelled", "message": "cancelled before the host ran"})
        self.progress(len(self.targets))
        summary = _summary(self.spec, self.check, self.results, self.outcome, self.attempts, duration_s)
        return self.results, summary, cancelled


def step_runner(
    store: Store, settings: Settings, internal_vars: Mapping[str, Any] | None = None
) -> Callable[[JobRun, str, list[str], JSON, bool], dict[str, JSON]]:
    """What the level job runs each profile step with: one playbook on some devices, inside the
    level job, reporting levels rather than playbook results (see :mod:`evc.levels`)."""
    catalog = Catalog.from_settings(settings)
    steps = itertools.count(1)  # numbers the playbook runs of the level job: their idents differ

    def run_step(run: JobRun, playbook: str, device_ids: list[str], extra_vars: JSON, check: bool) -> dict[str, JSON]:
        spec = catalog.get(playbook)
        if check and not spec.check_mode:
            return {
                d: {"status": HostStatus.OK, "changed": False, "message": "no check mode: not verified"}
                for d in device_ids
            }
        results, _, _ = run_spec(
            store, settings, run, spec, device_ids, extra_vars, check=check, internal_vars=internal_vars,
            report=False, step=next(steps),
        )  # fmt: skip
        return results

    return run_step


def _jump_diagnosis(settings: Settings, dev: Device) -> JSON:
    """Ansible says only "unreachable" when the ProxyJump hop fails: name the jump host and
    the reason (e.g. jump_host_key_mismatch) when the hop is what failed."""
    from evc import ssh

    err = asyncio.run(ssh.check_jump_host(ssh.target_of(dev), settings))
    return {"reason": err.reason, "message": err.message} if err is not None else {}


def _sleep(seconds: float, run: JobRun) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not run.cancelled():
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _run_once(
    settings: Settings,
    run: JobRun,
    spec: PlaybookSpec,
    values: JSON,
    devices: list[Device],
    ident: str,
    check: bool,
    forks: int,
    secret_values: list[str],
    internal: JSON,
) -> RunOutcome:
    registry = devices
    if any(d.get("jump_host") for d in devices):
        registry = run.store.all_devices()
    with job_inventory(devices, settings.key_path, ident, registry=registry, internal_vars=internal) as inv:
        for dev_id, why in inv.refused.items():
            run.event(f"{dev_id} left out: {why}", type="provision", target=dev_id, reason="record")
        if not inv.hosts:
            return RunOutcome("failed", None, {}, 0, 0.0, error="no device fit in the inventory")
        spec_run = PlaybookRun(
            playbook=spec.path,
            inventory=inv,
            ident=ident,
            extra_vars=values,
            forks=forks,
            check=check,
            timeout_s=max(60, settings.task_soft_time_limit_s - 30),
            connect_timeout_s=settings.ssh_connect_timeout_s,
            secrets=secret_values,
        )
        outcome = run_playbook(spec_run, run, cancelled=run.cancelled)
    for dev_id, why in inv.refused.items():
        outcome.hosts.pop(dev_id, None)
        outcome.hosts[dev_id] = HostResult(failed=1, message=why)
    return outcome


def _summary(
    spec: PlaybookSpec,
    check: bool,
    results: Mapping[str, JSON],
    outcome: RunOutcome | None,
    attempts: int,
    duration_s: float,
) -> JSON:
    counts = dict.fromkeys(strings(*HostStatus), 0)
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    counts["total"] = len(results)
    counts["changed"] = sum(1 for r in results.values() if r.get("changed"))
    summary: JSON = {
        "playbook": spec.name,
        "check": check,
        "hosts": counts,
        "attempts": attempts,
        "ansible_status": outcome.status if outcome else None,
        "ansible_rc": outcome.rc if outcome else None,
        "events": outcome.events if outcome else 0,
        "duration_s": round(duration_s, 3),
        "retryable": sorted(t for t, r in results.items() if r["status"] in RETRYABLE),
    }
    if check:
        summary["drift"] = {t: [c["task"] for c in r.get("drift", [])] for t, r in results.items() if r.get("drift")}
    return summary


__all__ = [
    "BEFORE_RUN", "MAX_RETRIES", "ON_SUCCESS", "RETRYABLE", "RUNNABLE_STATES", "ProvisionFailed", "ProvisionRequest",
    "ansible_ident", "run_spec", "step_runner",
    "RetryPolicy", "artifact_root", "gate", "provision", "refusal", "resolve_artifacts", "resolve_targets",
    "retry_job", "submit_provision",
]  # fmt: skip
