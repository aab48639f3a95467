"""FL jobs as the API and CLI see them: submit, show, stop, resume, download a model; and the two
helper jobs, installing the FL client on devices and partitioning a dataset onto them.

Plain code over a Store and a job sender; the round engine itself is :mod:`evc.fl.orchestrator`.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from evc import jobs
from evc import pool as pooling
from evc.choices import PARTITIONS
from evc.context import Context
from evc.errors import Conflict, DeviceError, NotFound, PreconditionFailed, SSHTimeout, ValidationError
from evc.fl import channels
from evc.fl.checkpoint import latest_round, list_rounds, load_checkpoint
from evc.fl.data import load_reference_digits, partition_dirichlet, partition_iid, save_shard
from evc.fl.models import is_device_model, validate_model_spec
from evc.fl.orchestrator import FLSpec, checkpoint_dir, evaluation_dir, fl_ready
from evc.fl.protocol import params_to_npz
from evc.fl.strategy import make_strategy
from evc.jobs import JobRun, Partial
from evc.model import JSON, Device, EventType, FLPhase, Job, JobKindName, JobState, Queue, strings
from evc.queue import JobQueue
from evc.settings import Settings
from evc.store import Store, now

#: the training settings a job may give at the top level (the rest go in strategy_params)
PLAN_FIELDS = (
    "fraction_fit",
    "min_fit_clients",
    "min_available_clients",
    "local_epochs",
    "lr",
    "batch_size",
    "seed",
)
PYTHON_RE = re.compile(r"^[A-Za-z0-9_./~+-]{1,200}$")
QUEUE_RE = re.compile(r"^fl(-[a-z0-9_-]{1,40})?$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PATH_FIELDS = frozenset({"job", "device", "name", "index"})
#: where the partition helper puts shards when no path is given
DEFAULT_SHARD_PATH = "~/.evc/fl/data/{dataset}/shard.npz"


# ---------------------------------------------------------------------- submitting a job
def resolve_devices(store: Store, devices: Sequence[str] | None, cluster: str | None) -> list[str]:
    """The job's devices in order (their order is their client index): the list given, or the
    cluster's members. Raises NotFound for an unknown device or cluster."""
    if cluster:
        store.get_cluster(cluster)
        ids = list(store.cluster_members(cluster))
    else:
        ids = list(dict.fromkeys(devices or []))
    if not ids:
        raise ValidationError("give devices or a cluster with members", field="devices")
    found = {d["id"] for d in store.get_devices(ids)}
    missing = [d for d in ids if d not in found]
    if missing:
        raise NotFound(f"no such device(s): {', '.join(missing)}", devices=missing)
    return ids


def device_python(store: Store, python: str | None, cluster: str | None) -> str:
    """The Python that runs the FL client: the one given; else the cluster's setting
    (:func:`evc.levels.fl_python`: L1's environment with numpy); else ``python3``."""
    from evc.levels import fl_python

    if python:
        chosen = python
    elif cluster:
        chosen = fl_python(store.get_cluster(cluster))
    else:
        chosen = "python3"
    if not PYTHON_RE.match(chosen):
        raise ValidationError("python must be an interpreter name or path", field="python")
    return chosen


def _check_path(path: object, where: str) -> str:
    if not isinstance(path, str) or not path or len(path) > 500 or "\n" in path or "\0" in path:
        raise ValidationError(f"{where} must be a path on the device", field="data")
    names = set(re.findall(r"{([^{}]*)}", path))
    if names - PATH_FIELDS:
        raise ValidationError(
            f"{where} may use {{job}}, {{device}}, {{name}} and {{index}}, not {sorted(names - PATH_FIELDS)}",
            field="data",
        )
    return path


def _check_data(data: Mapping[str, Any], devices: Sequence[str]) -> JSON:
    """``{"path": template}`` and/or ``{"paths": {device: path}}``; every device covered."""
    out: JSON = {}
    if data.get("path") is not None:
        out["path"] = _check_path(data["path"], "data.path")
    paths = data.get("paths") or {}
    if not isinstance(paths, Mapping):
        raise ValidationError("data.paths maps device ids to paths", field="data")
    unknown = [d for d in paths if d not in devices]
    if unknown:
        raise ValidationError(f"data.paths names devices not in the job: {unknown}", field="data")
    if paths:
        out["paths"] = {d: _check_path(p, f"data.paths[{d}]") for d, p in paths.items()}
    if "path" not in out and set(devices) - set(paths):
        raise ValidationError("data needs a path template or a path for every device", field="data")
    return out


def build_spec(settings: Settings, data: Mapping[str, Any], devices: list[str]) -> FLSpec:
    """Check a submission and turn it into the job's parameters (422 saying what is wrong)."""
    model = validate_model_spec(data.get("model", "softmax"))
    strategy_params: JSON = dict(data.get("strategy_params") or {})
    for key in PLAN_FIELDS:
        if data.get(key) is not None:
            strategy_params[key] = data[key]
    strategy_params["model"] = model
    name = str(data.get("strategy", "fedavg"))
    strategy = make_strategy(name, **strategy_params)
    if strategy.plan.min_available_clients > len(devices):
        raise ValidationError(
            f"min_available_clients ({strategy.plan.min_available_clients}) is more than the "
            f"job's {len(devices)} devices",
            field="min_available_clients",
        )
    rounds = int(data.get("rounds", 10))
    if not 1 <= rounds <= 100_000:
        raise ValidationError("rounds must be between 1 and 100000", field="rounds")
    timeout = float(data.get("round_timeout", 60.0))
    ceiling = settings.task_soft_time_limit_s - 10
    if not 0 < timeout <= ceiling:
        raise ValidationError(
            f"round_timeout must be in (0, {ceiling}] s (the tasks' soft time limit less 10 s)",
            field="round_timeout",
        )
    python = str(data.get("python") or "python3")
    if not PYTHON_RE.match(python):
        raise ValidationError("python must be an interpreter name or path", field="python")
    queue = str(data.get("queue") or Queue.FL)
    if not QUEUE_RE.match(queue):
        raise ValidationError("queue must be 'fl' or 'fl-<name>'", field="queue")
    test_set = data.get("test_set")
    if test_set is not None and (not isinstance(test_set, str) or not NAME_RE.match(test_set)):
        raise ValidationError("test_set must be the name of a server-side test set", field="test_set")
    n_features, n_classes = data.get("n_features"), data.get("n_classes")
    if test_set and n_features is None and (evaluation_dir(settings) / f"{test_set}.npz").is_file():
        with np.load(evaluation_dir(settings) / f"{test_set}.npz") as z:
            n_features = int(z["X"].shape[1])
            n_classes = n_classes or int(z["y"].max()) + 1
    return FLSpec(
        export=_check_export(data.get("export"), model),
        devices=tuple(devices),
        rounds=rounds,
        strategy=strategy.name,
        strategy_params=strategy.params(),
        data=_check_data(data.get("data") or {}, devices),
        round_timeout=timeout,
        python=python,
        test_set=test_set,
        queue=queue,
        n_features=int(n_features or 64),
        n_classes=int(n_classes or 10),
    )


def _check_export(export: Any, model: str) -> JSON | None:
    """``{"name", "version"}``: register the finished job's model (:mod:`evc.fl.export`)."""
    if export is None:
        return None
    if not isinstance(export, Mapping) or set(export) != {"name", "version"}:
        raise ValidationError('export must be {"name": ..., "version": ...}', field="export")
    if is_device_model(model):
        raise ValidationError(f"model {model!r} is device code: it has no ONNX export", field="export")
    for key in ("name", "version"):
        if not NAME_RE.match(str(export[key])):
            raise ValidationError(f"export.{key} must be 1-64 letters, digits, '.', '_' or '-'", field="export")
    return {"name": str(export["name"]), "version": str(export["version"])}


def check_ready(store: Store, devices: Sequence[str]) -> None:
    """Refuse devices that cannot take part in FL at all (no client, below L4)."""
    bad = [d for d in store.get_devices(devices) if not fl_ready(d)]
    if bad:
        names = ", ".join(f"{d.get('name', d['id'])} (L{int(d.get('level') or 0)})" for d in bad[:10])
        raise PreconditionFailed(
            f"federated learning needs function level L4 or the FL client installed; not ready: "
            f"{names}. Install it with `evc fl install` (POST /api/v1/fl/install) or raise the "
            "cluster to L4 (the fl-client playbook)",
            devices=[d["id"] for d in bad],
        )


def submit(ctx: Context, data: Mapping[str, Any], *, pipe: Any = None) -> Job:
    """Validate an FL job and enqueue it (kind ``fl``); returns the job."""
    store, settings = ctx.store, ctx.settings
    devices = resolve_devices(store, data.get("devices"), data.get("cluster"))
    python = device_python(store, data.get("python"), data.get("cluster"))
    spec = build_spec(settings, {**data, "python": python}, devices)
    check_ready(store, devices)
    job, _ = ctx.submit(JobKindName.FL, params=spec.to_params(), targets=devices, pipe=pipe)
    return job


# ---------------------------------------------------------------------- showing and steering
#: the states an FL job resumes from: stopped (cancelled) or failed
RESUMABLE: tuple[str, ...] = strings(JobState.CANCELLED, JobState.FAILED)


def get_fl_job(store: Store, job_id: str) -> Job:
    job = jobs.get(store, job_id)
    if job.get("kind") != JobKindName.FL:
        raise NotFound(f"job {job_id} is not a federated learning job", id=job_id)
    return job


def view(store: Store, job_id: str) -> Job:
    """The job with its FL state and a record per closed round (metrics, failures, late)."""
    job = jobs.public(get_fl_job(store, job_id), store)
    st = store.fl_state(job_id) or {}
    late = store.fl_late(job_id)
    rounds = store.fl_rounds(job_id)
    by_round: dict[int, list[JSON]] = {}
    for item in late:
        if item.get("round") is not None:
            by_round.setdefault(int(item["round"]), []).append(item)
    for rec in rounds:
        rec["late"] = by_round.get(int(rec["round"]), [])
    job["fl"] = {
        "phase": st.get("phase", FLPhase.QUEUED),
        "round": st.get("round", 0),
        "rounds_total": job["params"].get("rounds"),
        "selected": st.get("selected") or [],
        "deadline": st.get("deadline"),
        "rounds": rounds,
        "late": late,
    }
    return job


def stop(store: Store, job_id: str, revoke: Any = None) -> Job:
    """Stop a job at its next round boundary (a queued job at once)."""
    get_fl_job(store, job_id)
    return jobs.cancel(store, job_id, revoke=revoke)


def resume(store: Store, sender: jobs.Sender, job_id: str) -> Job:
    """Resume a stopped or failed job from its last checkpoint; on a running job, put work
    lost with a stopped worker back on the queue."""
    job = get_fl_job(store, job_id)
    if job["state"] == JobState.RUNNING:
        JobQueue.of(sender).publish("evc.fl_recover", [job_id], queue=Queue.FL.value, ignore_result=True)
        return job
    if job["state"] not in RESUMABLE:
        raise Conflict(f"job {job_id} is {job['state']}: only a stopped or failed job resumes",
                       state=job["state"])  # fmt: skip
    attempt = int(job.get("attempt") or 0) + 1
    if not store.transition_job(
        job_id, JobState.QUEUED, list(RESUMABLE), attempt=attempt, cancel_requested=False,
        finished_at=None, error=None,
    ):  # fmt: skip
        raise Conflict(f"job {job_id} changed state meanwhile; try again")
    job = jobs.get(store, job_id)
    store.add_event(job_id, {"type": EventType.JOB, "state": JobState.QUEUED, "message": f"resume (attempt {attempt})"})
    jobs.enqueue(store, sender, job)
    return job


def model_npz(settings: Settings, store: Store, job_id: str, round: int | None = None) -> tuple[bytes, int]:
    """The global model after round *round* (default: the latest) as ``.npz`` bytes holding
    ``arr_0 ..`` in parameter order, and the round it is from."""
    get_fl_job(store, job_id)
    directory = checkpoint_dir(settings)
    if round is None:
        round = latest_round(directory, job_id)
        if round is None:
            raise NotFound(f"job {job_id} has no model yet", id=job_id)
    elif round not in list_rounds(directory, job_id):
        raise NotFound(f"job {job_id} has no model for round {round}", id=job_id, round=round)
    return params_to_npz(load_checkpoint(directory, job_id, round).params), round


# ---------------------------------------------------------------------- installing the client
def _device_timeout(settings: Settings) -> float:
    """How long one device's install or upload may take (connect, then one command's worth)."""
    return settings.ssh_connect_timeout_s + settings.ssh_command_timeout_s


def install(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``fl-install`` job: ship the client to each target and record ``fl_client`` on it.

    One device failing does not stop the others: the job ends ``partial`` when some failed and
    fails when none succeeded, each device's reason in its result."""
    python = str(run.params.get("python") or "python3")
    devices = store.get_devices(run.job["targets"])

    async def one(dev: Device) -> tuple[str, JSON]:
        try:
            info = await asyncio.wait_for(channels.install_client(settings, dev, python), _device_timeout(settings))
        except TimeoutError:
            return dev["id"], {"ok": False, "error": SSHTimeout("the install did not finish in time").to_dict()}
        except DeviceError as exc:
            return dev["id"], {"ok": False, "error": exc.to_dict()}
        return dev["id"], {"ok": True, **info}

    async def all_() -> list[tuple[str, JSON]]:
        return list(await asyncio.gather(*(one(d) for d in devices)))

    results = pooling.call(all_())
    ok = 0
    for dev_id, res in results:
        if res["ok"]:
            ok += 1
            store.update_device(dev_id, fl_client={k: v for k, v in res.items() if k != "ok"})
        run.result(dev_id, res)
    if not ok:
        raise DeviceError(
            f"the FL client could not be installed on any of {len(devices)} devices: " + _reasons(results),
            reasons=_reason_map(results),
        )  # fmt: skip
    summary: JSON = {"installed": ok, "failed": len(devices) - ok, "python": python}
    if ok < len(devices):
        return Partial(summary, f"not installed on {len(devices) - ok} of {len(devices)} devices: {_reasons(results)}")
    return summary


def _reason_map(results: Sequence[tuple[str, JSON]]) -> dict[str, str]:
    return {d: str((r.get("error") or {}).get("message", "")) for d, r in results if not r["ok"]}


def _reasons(results: Sequence[tuple[str, JSON]], most: int = 5) -> str:
    """The failed devices' reasons in one line (the first *most*)."""
    bad = list(_reason_map(results).items())
    return "; ".join(f"{d}: {why}" for d, why in bad[:most]) + (" ..." if len(bad) > most else "")


# ---------------------------------------------------------------------- partitioning data
def shard_bytes(X: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, X=np.asarray(X, dtype=np.float64), y=np.asarray(y, dtype=np.int64))
    return buf.getvalue()


def partition(store: Store, settings: Settings, run: JobRun) -> JSON | Partial:
    """The ``fl-partition`` job: split a dataset into one shard per target device (IID or
    label-Dirichlet, as FEDERATED.md fixes them), push each over SFTP, and keep the test split
    server-side as test set ``<name>``. Device k (in target order) gets shard k."""
    p = run.params
    name = str(p.get("name") or "digits")
    seed = int(p.get("seed", 42))
    devices = {d["id"]: d for d in store.get_devices(run.job["targets"])}
    ids = [d for d in run.job["targets"] if d in devices]
    ds = load_reference_digits()
    if p.get("partition", "iid") == "dirichlet":
        parts = partition_dirichlet(ds.y_train, len(ids), float(p.get("alpha", 0.5)), seed)
    else:
        parts = partition_iid(len(ds.y_train), len(ids), seed)
    save_shard(evaluation_dir(settings) / f"{name}.npz", ds.X_test, ds.y_test)
    template = str(p.get("path") or DEFAULT_SHARD_PATH)

    async def one(k: int, dev_id: str) -> tuple[str, JSON]:
        idx = parts[k]
        dev = devices[dev_id]
        path = template.format(dataset=name, device=dev_id, name=dev.get("name", dev_id), index=k)
        try:
            data = shard_bytes(ds.X_train[idx], ds.y_train[idx])
            await asyncio.wait_for(channels.push(settings, dev, path, data), _device_timeout(settings))
        except TimeoutError:
            return dev_id, {"ok": False, "error": SSHTimeout("the upload did not finish in time").to_dict()}
        except DeviceError as exc:
            return dev_id, {"ok": False, "error": exc.to_dict()}
        labels, counts = np.unique(ds.y_train[idx], return_counts=True)
        return dev_id, {
            "ok": True, "path": path, "index": k, "num_examples": int(len(idx)),
            "label_counts": {str(int(a)): int(b) for a, b in zip(labels, counts, strict=True)},
        }  # fmt: skip

    async def all_() -> list[tuple[str, JSON]]:
        return list(await asyncio.gather(*(one(k, d) for k, d in enumerate(ids))))

    ok = 0
    results = pooling.call(all_())
    for dev_id, res in results:
        ok += bool(res["ok"])
        run.result(dev_id, res)
    if not ok:
        raise DeviceError(f"no shard could be pushed to any of {len(ids)} devices: " + _reasons(results),
                          reasons=_reason_map(results))  # fmt: skip
    path_template = template.replace("{dataset}", name)
    summary: JSON = {
        "dataset": name, "partition": p.get("partition", "iid"), "devices": len(ids), "pushed": ok,
        "test_set": name, "data_path": path_template,
        "created_at": now(),
    }  # fmt: skip
    if ok < len(ids):
        return Partial(summary, f"no shard on {len(ids) - ok} of {len(ids)} devices: {_reasons(results)}")
    return summary


def check_partition_args(data: Mapping[str, Any]) -> JSON:
    """Validate a partition request's parameters."""
    name = str(data.get("name") or "digits")
    if not NAME_RE.match(name):
        raise ValidationError("name must be letters, digits, '.', '_' or '-'", field="name")
    part = str(data.get("partition") or "iid")
    if part not in PARTITIONS:
        raise ValidationError("partition must be 'iid' or 'dirichlet'", field="partition")
    alpha = float(data.get("alpha", 0.5))
    if not alpha > 0:
        raise ValidationError("alpha must be > 0", field="alpha")
    path = str(data.get("path") or DEFAULT_SHARD_PATH)
    if not path.startswith("~/") and not path.startswith("/"):
        raise ValidationError("path must start with ~/ or /", field="path")
    names = set(re.findall(r"{([^{}]*)}", path))
    if names - {"dataset", "device", "name", "index"}:
        raise ValidationError("path may use {dataset}, {device}, {name} and {index}", field="path")
    return {"name": name, "partition": part, "alpha": alpha, "seed": int(data.get("seed", 42)), "path": path}


__all__ = [
    "DEFAULT_SHARD_PATH",
    "build_spec",
    "check_partition_args",
    "check_ready",
    "get_fl_job",
    "install",
    "model_npz",
    "partition",
    "resolve_devices",
    "resume",
    "stop",
    "submit",
    "view",
]
