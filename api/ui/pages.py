"""The console's pages (GET): fleet, device, jobs (with a live event stream), clusters,
federated learning, deployments, tokens. Each reads through the same store and services as the
API's views and renders a template."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from evc.api.deps import get_settings, get_store
from evc.api.ui import bp
from evc.api.ui.session import require_admin
from flask import Response, abort, redirect, render_template, request, stream_with_context, url_for

from evc import clusters, console, devices, jobs, profiles
from evc.deployments import service as deployments
from evc.fl import service as fl
from evc.model import JOB_STATES, DeviceState, JobKindName
from evc.provisioning.catalog import Catalog
from evc.store import TERMINAL_STATES, Store

#: how long one event stream stays open (the browser reconnects after it, from its last event)
STREAM_S = 25.0
PAGE = 100


def _names(store: Store) -> dict[str, str]:
    """Device id → name, for pages that show targets."""
    return {str(d["id"]): str(d.get("name") or d["id"]) for d in store.device_fields(None, ["name"])}


def _arg(name: str) -> str | None:
    return (request.args.get(name) or "").strip() or None


@bp.route("/")
def home() -> Any:
    return redirect(url_for("ui.fleet"))


@bp.route("/fleet")
def fleet() -> Any:
    """Devices: state, level, privilege, labels, last seen, a health sparkline; filters."""
    store = get_store()
    label = _arg("label")
    match = devices.matcher(_arg("state"), devices.parse_selector([label] if label else None), _arg("cluster"),
                            _arg("name"))  # fmt: skip
    items, total = store.list_devices(0, 500, match)
    history = store.health_history([d["id"] for d in items])
    rows = []
    for d in items:
        cpus = float((d.get("facts") or {}).get("cpus") or 1)
        values = console.health_values(history.get(d["id"], []), cpus)
        title = f"{d['name']}: load per CPU over the last {len(values)} health checks"
        rows.append({**devices.public(d), "seen": console.ago(d.get("last_seen")),
                     "spark": console.sparkline(values, title=title)})  # fmt: skip
    cls, _ = store.list_clusters(0, 200)
    return render_template("ui/fleet.html", rows=rows, total=total, states=[s.value for s in DeviceState], clusters=cls,
                           args=request.args)  # fmt: skip


@bp.route("/devices/<id:device_id>")
def device(device_id: str) -> Any:
    """One device: facts, what its privilege allows, recent jobs, its fleet events."""
    store = get_store()
    dev = devices.public(store.get_device(device_id))
    recent, _ = store.list_jobs(0, 20, target=device_id)
    events, _ = store.fleet_event_page(0, 30, lambda ev: ev.get("device") == device_id)
    history = store.health_history([device_id])[device_id]
    cpus = float((dev.get("facts") or {}).get("cpus") or 1)
    title = f"{dev['name']}: load per CPU over the last {len(history)} health checks"
    spark = console.sparkline(console.health_values(history, cpus), width=360, height=48, title=title)
    playbooks = [s.public() for s in Catalog.from_settings(get_settings()).list()]
    return render_template("ui/device.html", d=dev, jobs=recent, events=events, spark=spark, playbooks=playbooks,
                           seen=console.ago(dev.get("last_seen")), ago=console.ago)  # fmt: skip


@bp.route("/jobs")
def job_list() -> Any:
    """Jobs, newest first, filtered by kind, state and target device."""
    store = get_store()
    items, total = store.list_jobs(0, PAGE, kind=_arg("kind"), state=_arg("state"), target=_arg("target"))
    return render_template("ui/jobs.html", jobs=items, total=total, kinds=sorted(k.value for k in JobKindName),
                           states=JOB_STATES, names=_names(store), args=request.args, ago=console.ago)  # fmt: skip


@bp.route("/jobs/<id:job_id>")
def job(job_id: str) -> Any:
    """A job: state, per-host results (drift diffs in check mode), its events, live while it runs."""
    store = get_store()
    j = jobs.public(jobs.get(store, job_id), store)
    if j.get("kind") == JobKindName.FL:
        return redirect(url_for("ui.fl_job", job_id=job_id))
    events = store.events(job_id, 0, 1000)
    last = events[-1]["seq"] if events else 0
    return render_template("ui/job.html", j=j, events=events, last=last, names=_names(store),
                           live=j["state"] not in TERMINAL_STATES, ago=console.ago)  # fmt: skip


@bp.route("/jobs/<id:job_id>/stream")
def job_stream(job_id: str) -> Response:
    """The job's events as server-sent events, from ``Last-Event-ID`` (or ``?after=``); an
    ``end`` event with the final state once it has finished."""
    store = get_store()
    jobs.get(store, job_id)
    try:
        after = int(request.headers.get("Last-Event-ID") or request.args.get("after") or 0)
    except ValueError:
        abort(400, "Last-Event-ID and after are event numbers")
    return Response(stream_with_context(_events(store, job_id, after)), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


def _events(store: Store, job_id: str, after: int) -> Iterator[str]:
    deadline = time.monotonic() + STREAM_S
    yield "retry: 1000\n\n"
    while True:
        items = store.events(job_id, after, 200)
        for ev in items:
            after = int(ev["seq"])
            yield f"id: {after}\nevent: job-event\ndata: {json.dumps(ev)}\n\n"
        if not items:
            state = store.job_state(job_id)
            if state is None or state in TERMINAL_STATES:
                yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
                return
            if time.monotonic() > deadline:
                return
            yield ": waiting\n\n"
            time.sleep(0.3)


@bp.route("/clusters")
def cluster_list() -> Any:
    store = get_store()
    items, _ = store.list_clusters(0, 200)
    return render_template("ui/clusters.html", clusters=[clusters.public(store, c) for c in items],
                           levels=profiles.LEVELS)  # fmt: skip


@bp.route("/clusters/<id:cluster_id>")
def cluster(cluster_id: str) -> Any:
    """A cluster: profile, members with the level each reached and why not higher; raise level."""
    store = get_store()
    cl = clusters.public(store, store.get_cluster(cluster_id))
    members = store.get_devices(cl["members"])
    profile = profiles.get(cl["profile"]).to_dict()
    recent, _ = store.list_jobs(0, 10, kind=JobKindName.LEVEL)
    recent = [j for j in recent if (j.get("params") or {}).get("cluster_id") == cluster_id]
    return render_template("ui/cluster.html", cl=cl, members=members, profile=profile, levels=profiles.LEVELS,
                           jobs=recent, ago=console.ago)  # fmt: skip


@bp.route("/fl")
def fl_list() -> Any:
    store = get_store()
    items, total = store.list_jobs(0, PAGE, kind=JobKindName.FL)
    cls, _ = store.list_clusters(0, 200)
    return render_template("ui/fl.html", jobs=items, total=total, clusters=cls, devices=store.all_devices(),
                           ago=console.ago)  # fmt: skip


@bp.route("/fl/<id:job_id>")
def fl_job(job_id: str) -> Any:
    """An FL job: accuracy and loss curves per round, participants and failures, stop/resume."""
    store = get_store()
    j = fl.view(store, job_id)
    rounds = j["fl"]["rounds"]
    last = store.event_count(job_id)
    return render_template("ui/fl_job.html", j=j, rounds=rounds, charts=console.fl_curves(rounds),
                           names=_names(store), live=j["state"] not in TERMINAL_STATES, last=last,
                           resumable=j["state"] in fl.RESUMABLE)  # fmt: skip


@bp.route("/fl/<id:job_id>/model")
def fl_model(job_id: str) -> Response:
    """The global model of the latest round (or ``?round=``) as ``.npz``."""
    rnd = request.args.get("round", type=int)
    data, got = fl.model_npz(get_settings(), get_store(), job_id, rnd)
    return Response(data, mimetype="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-round-{got}.npz"'})  # fmt: skip


@bp.route("/deployments")
def deployment_list() -> Any:
    store = get_store()
    items, total = deployments.list_deployments(store, 0, PAGE)
    return render_template("ui/deployments.html", items=items, total=total, names=_names(store), ago=console.ago)


@bp.route("/deployments/<id:deployment_id>")
def deployment(deployment_id: str) -> Any:
    store = get_store()
    return render_template("ui/deployment.html", dep=deployments.view(store, deployment_id), names=_names(store),
                           ago=console.ago)  # fmt: skip


@bp.route("/tokens")
def tokens() -> Any:
    """Operator tokens, enrollment tokens and the latest audit entries (admin)."""
    require_admin()
    store = get_store()
    toks, _ = store.list_tokens(0, 200)
    enrs, _ = store.list_enrollments(0, 200)
    audit, _ = store.audit_log(0, 30)
    from evc import auth

    return render_template("ui/tokens.html", tokens=[auth.public_token(t) for t in toks],
                           enrollments=[auth.public_token(e) for e in enrs], audit=audit, ago=console.ago,
                           until=console.until)  # fmt: skip
