"""Parallel inference: one data set spread over a deployment's running edge servers.

``submit`` checks the request and enqueues a ``parallel-infer`` job. The job runs one worker
thread per device, each with its own keep-alive connection to the device's edge server (Open
Inference Protocol, binary tensors); the workers pull chunks from one
:class:`~evc.inference.schedule.Scheduler` (dynamic chunk sizes from each device's measured
speed, stragglers' chunks re-issued, a failed device's chunks re-queued, every item recorded
once). The job's progress carries the items done and each device's rate; its events say when a
device fails or is dropped; its results (``<data_dir>/inference/jobs/<job>/results.npz``) hold,
per item in input order, the output, the prediction, the device that answered and the latency
of the request that carried it; its summary the throughput, each device's share and the
accuracy when the data set has labels.

The controller's worker must reach each device's endpoint (``host:port``). For devices on
another network, forward a local port to the device's edge server over its SSH connection
(``ssh -L``, or asyncssh's ``forward_local_port``) and deploy with that port (README).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evc.context import Context
from evc.errors import InferFailed, JobCancelled, PreconditionFailed, ValidationError
from evc.inference import datasets, shards
from evc.inference.oip import NUMPY, Connection, ModelIO
from evc.inference.schedule import Chunk, ChunkPolicy, Scheduler
from evc.jobs import JobRun
from evc.model import JSON, DeploymentDeviceState, EventType, Job, JobKindName
from evc.settings import Settings
from evc.store import Store

PROGRESS_EVERY_S = 0.5
#: what a progress report is handed to besides the job (the task's Celery event, for Flower)
Notify = Callable[..., None]
#: a device's wait before it asks again after a failure (while it is still in)
RETRY_AFTER_S = 0.2


@dataclass(frozen=True)
class Target:
    """A running device of the deployment: id, name and its edge server's ``host:port``."""

    device: str
    name: str
    endpoint: str


def targets(store: Store, dep: Mapping[str, Any]) -> list[Target]:
    """The deployment's devices that run its edge server now."""
    states = store.deployment_devices(dep["id"])
    running = [d for d in dep["devices"] if states.get(d, {}).get("state") == DeploymentDeviceState.RUNNING
               and states[d].get("endpoint")]  # fmt: skip
    names = {d["id"]: str(d.get("name") or d["id"]) for d in store.get_devices(running)} if running else {}
    return [Target(d, names.get(d, d), str(states[d]["endpoint"])) for d in running]


def policy_of(chunk: Mapping[str, Any], mode: str) -> ChunkPolicy:
    """The chunk settings of a request as a policy (unknown keys or bad values: 422)."""
    known = {f.name for f in dataclasses.fields(ChunkPolicy)} - {"mode"}
    extra = sorted(set(chunk) - known)
    if extra:
        raise ValidationError(f"unknown chunk settings {extra}; known: {sorted(known)}", field="chunk")
    try:
        return ChunkPolicy(mode=mode, **chunk)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"chunk: {exc}", field="chunk") from exc


def submit(ctx: Context, data: Mapping[str, Any]) -> Job:
    """Check a ``parallel`` request (deployment with running devices, data set, chunk settings)
    and enqueue its ``parallel-infer`` job."""
    dep = ctx.store.get_deployment(str(data["deployment"]))
    running = targets(ctx.store, dep)
    if not running:
        raise PreconditionFailed(f"deployment {dep['id']} has no running device (evc deployment show {dep['id']})")
    ref = str(data["dataset"])
    repeat = datasets.check_repeat(int(data.get("repeat") or 1))
    if shards.is_shards(ref):  # on the devices: counted when the job reads them
        shards.shard_name(ref)
        items = None
    else:
        items = int(datasets.describe(ctx.settings, ref)["items"]) * repeat
    policy = policy_of(data.get("chunk") or {}, str(data.get("mode") or "dynamic"))
    params: JSON = {
        "kind": "parallel", "deployment": dep["id"], "dataset": ref, "repeat": repeat, "items": items,
        "mode": policy.mode, "chunk": {k: v for k, v in dataclasses.asdict(policy).items() if k != "mode"},
    }  # fmt: skip
    job, _ = ctx.submit(JobKindName.PARALLEL_INFER, params=params, targets=[t.device for t in running])
    ctx.store.audit(ctx.actor, "inference.parallel", job["id"], deployment=dep["id"], dataset=ref)
    return job


# ------------------------------------------------------------------------ the job
@dataclass
class _Work:
    """One job's shared state: the scheduler, the items, what came back, the events to write."""

    sched: Scheduler
    io: ModelIO
    x: np.ndarray
    targets: list[Target]
    timeout_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    out: np.ndarray | None = None
    device: np.ndarray = field(init=False)
    latency_ms: np.ndarray = field(init=False)
    events: list[JSON] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notify: Notify | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def __post_init__(self) -> None:
        self.device = np.full(len(self.x), -1, np.int16)
        self.latency_ms = np.zeros(len(self.x), np.float32)

    def record(self, index: int, chunk: Chunk, result: np.ndarray, took_s: float) -> None:
        """*result* of *chunk* from device number *index*: its new items (under the lock)."""
        new = self.sched.complete(self.targets[index].device, chunk, time.monotonic())
        if not new:
            return
        rows = np.asarray(new) - chunk.start
        flat = result.reshape(chunk.size, -1)
        if self.out is None:
            self.out = np.zeros((len(self.x), flat.shape[1]), flat.dtype)
        self.out[new] = flat[rows]
        self.device[new] = index
        self.latency_ms[new] = took_s * 1000.0
        if self.sched.finished and self.finished is None:
            self.finished = time.monotonic()

    def failed(self, index: int, chunk: Chunk, error: InferFailed) -> bool:
        t = self.targets[index]
        alive = self.sched.fail(t.device, chunk, time.monotonic())
        self.errors[t.device] = error.message
        what = "its chunk went back to the queue" if alive else "dropped; its chunks went to the others"
        self.events.append({"type": EventType.STEP, "target": t.device,
                            "message": f"{t.name}: items {chunk.start}-{chunk.stop - 1} failed ({error.message}); "
                                       f"{what}"})  # fmt: skip
        return alive


def _worker(work: _Work, index: int) -> None:
    """One device's loop: pull a chunk, send it, record it; until the job is done or stops."""
    t = work.targets[index]
    conn = Connection(t.endpoint, work.timeout_s)
    try:
        while not work.stop.is_set():
            with work.lock:
                if work.sched.finished or work.sched.devices[t.device].dropped:
                    return
                chunk = work.sched.next(t.device, time.monotonic())
            if chunk is None:
                work.stop.wait(0.02)
                continue
            t0 = time.monotonic()
            try:
                result = _answer(conn, work.io, work.x[chunk.start : chunk.stop])
            except InferFailed as exc:
                with work.lock:
                    alive = work.failed(index, chunk, exc)
                if not alive:
                    return
                work.stop.wait(RETRY_AFTER_S)
                continue
            with work.lock:
                work.record(index, chunk, result, time.monotonic() - t0)
    finally:
        conn.close()


def _answer(conn: Connection, io: ModelIO, batch: np.ndarray) -> np.ndarray:
    """The model's output for *batch* from one device; a response that does not decode, or
    holds another number of results, fails like an unreachable device."""
    try:
        result = conn.infer(io, batch)
    except (ValueError, KeyError, TypeError) as exc:
        raise InferFailed(f"{conn.endpoint}: an unreadable response ({exc})") from exc
    if result.shape[:1] != batch.shape[:1]:
        raise InferFailed(f"{conn.endpoint}: {result.shape[:1]} results for {len(batch)} items")
    return result


def _load(store: Store, settings: Settings, job: JobRun, ts: list[Target]) -> tuple[datasets.Data, JSON]:
    """The job's items: an uploaded or named data set, or the FL shards on the devices (then
    also where they came from: ``shards`` per device, ``shards_missing`` with the reasons)."""
    ref, repeat = str(job.params["dataset"]), int(job.params.get("repeat") or 1)
    if not shards.is_shards(ref):
        return datasets.load(settings, ref).repeated(repeat), {}
    data, counts, missing = shards.gather(settings, store.get_devices([t.device for t in ts]), ref)
    for name, why in missing.items():
        job.event(f"{name}: no shard ({why}); its items are not in the job", type=EventType.STEP)
    return data.repeated(repeat), {"shards": counts, "shards_missing": missing}


def _model_io(ts: list[Target], dep: Mapping[str, Any], timeout_s: float) -> ModelIO:
    """The served model's input and output, from the first device that answers."""
    errors = []
    for t in ts:
        conn = Connection(t.endpoint, timeout_s)
        try:
            return conn.model_io(str(dep["model"]), str(dep["served_version"]))
        except InferFailed as exc:
            errors.append(f"{t.name}: {exc.message}")
        finally:
            conn.close()
    raise InferFailed("no device of the deployment answered: " + "; ".join(errors), deployment=dep["id"])


def _inputs(data: datasets.Data, io: ModelIO) -> np.ndarray:
    x = data.x
    shape = tuple(x.shape[1:])
    if len(shape) != len(io.shape) or any(m not in (-1, s) for m, s in zip(io.shape, shape, strict=True)):
        raise ValidationError(f"the data set's items are {list(shape)}; model {io.model} takes {list(io.shape)}")
    return np.ascontiguousarray(x.astype(NUMPY.get(io.datatype, "float32"), copy=False))


def _report(run: JobRun, work: _Work, last: list[float]) -> None:
    """Events so far, and progress (items done, each device's rate) at most every 0.5 s."""
    with work.lock:
        events, work.events = work.events, []
        done = work.sched.done_items
        rates = {t.name: round(work.sched.devices[t.device].rate or 0.0, 1) for t in work.targets}
    if events:
        run.events(events)
    t = time.monotonic()
    if t - last[0] >= PROGRESS_EVERY_S or done == len(work.x):
        last[0] = t
        elapsed = t - work.started
        per_s = round(done / max(elapsed, 1e-9), 1)
        run.progress(done, len(work.x), rates=rates, items_per_s=per_s)
        if work.notify is not None:
            work.notify(done=done, total=len(work.x), items_per_s=per_s, rates=rates)


def _drive(run: JobRun, work: _Work) -> None:
    threads = [threading.Thread(target=_worker, args=(work, i), daemon=True) for i in range(len(work.targets))]
    for th in threads:
        th.start()
    last = [0.0]
    try:
        while any(th.is_alive() for th in threads):
            for th in threads:
                th.join(PROGRESS_EVERY_S / len(threads))
            _report(run, work, last)
            if run.cancelled():
                raise JobCancelled("cancelled by request")
    finally:
        work.stop.set()
        for th in threads:
            th.join(work.timeout_s)
    _report(run, work, last)


def run(store: Store, settings: Settings, job: JobRun, notify: Notify | None = None) -> JSON:
    """The ``parallel-infer`` job: every item of the data set through the deployment's devices;
    *notify* is called with each progress report (the task sends it to Flower)."""
    p = job.params
    dep = store.get_deployment(str(p["deployment"]))
    ts = [t for t in targets(store, dep) if t.device in set(job.job["targets"])]
    if not ts:
        raise PreconditionFailed(f"deployment {dep['id']} has no running device now", deployment=dep["id"])
    data, sources = _load(store, settings, job, ts)
    io = _model_io(ts, dep, settings.inference_timeout_s)
    x = _inputs(data, io)
    policy = ChunkPolicy(mode=str(p.get("mode") or "dynamic"), **(p.get("chunk") or {}))
    work = _Work(Scheduler(len(x), [t.device for t in ts], policy), io, x, ts, settings.inference_timeout_s)
    work.notify = notify
    job.event(f"{len(x)} items over {len(ts)} device(s) ({policy.mode})", type=EventType.STEP)
    _drive(job, work)
    if not work.sched.finished or work.out is None:
        raise InferFailed(
            f"{work.sched.done_items} of {len(x)} items answered: every device failed ("
            + "; ".join(f"{t.name}: {work.errors.get(t.device, '?')}" for t in ts) + ")", deployment=dep["id"],
        )  # fmt: skip
    summary = _finish(settings, job, work, data, dep)
    return {**summary, **sources}


def _finish(settings: Settings, job: JobRun, work: _Work, data: datasets.Data, dep: Mapping[str, Any]) -> JSON:
    """Write the results file; the job's summary."""
    assert work.out is not None
    out = work.out.astype(np.float32, copy=False)
    arrays: dict[str, np.ndarray] = {
        "output": out, "prediction": out.argmax(axis=1).astype(np.int64), "score": out.max(axis=1),
        "device": work.device, "latency_ms": work.latency_ms, "devices": np.array([t.name for t in work.targets]),
    }  # fmt: skip
    if data.y is not None:
        arrays["label"] = data.y
    datasets.save_results(settings, job.id, arrays)
    makespan = (work.finished or time.monotonic()) - work.started
    per_device = work.sched.summary()
    summary: JSON = {
        "deployment": dep["id"], "model": f"{dep['model']}:{dep['served_version']}", "mode": work.sched.policy.mode,
        "items": len(work.x), "makespan_s": round(makespan, 3), "items_per_s": round(len(work.x) / makespan, 1),
        "devices": {t.name: per_device[t.device] for t in work.targets},
        "duplicates_dropped": work.sched.duplicates, "reissued": work.sched.reissued,
        "requeued": work.sched.requeued, "dropped": [t.name for t in work.targets
                                                     if work.sched.devices[t.device].dropped],
        "results": f"/api/v1/inference/jobs/{job.id}/results",
    }  # fmt: skip
    if data.y is not None:
        summary["accuracy"] = round(float((arrays["prediction"] == data.y).mean()), 4)
    shares = ", ".join(f"{n} {d['share']:.0%}" for n, d in summary["devices"].items())
    job.event(f"{len(work.x)} items in {makespan:.2f} s ({summary['items_per_s']}/s): {shares}", type=EventType.STEP)
    return summary


__all__ = ["Target", "policy_of", "run", "submit", "targets"]
