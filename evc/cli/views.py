"""Human views of the `evc` command: a job, a cluster, a health sweep, the fleet event stream.

Each takes the API's JSON (what ``--json`` prints unchanged) and shows it to a person: names
beside ids, states in colour, per-target outcomes with their reasons, check-mode drift diffs."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from evc.cli.format import human_time, percent, show, table
from evc.client import Client

STATE_COLOURS = {"succeeded": "green", "online": "green", "failed": "red", "offline": "red", "unreachable": "red"}
EVENT_COLUMNS = ["ts", "type", "device", "from", "to", "reason"]


def _state(state: Any) -> str:
    colour = STATE_COLOURS.get(str(state), "yellow")
    return f"[{colour}]{escape(str(state))}[/{colour}]"


def devices_by_id(client: Client) -> dict[str, dict[str, Any]]:
    """Every device by id (one listing, paged)."""
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = client.get("/api/v1/devices", limit=500, offset=offset)
        out.update({d["id"]: d for d in page["items"]})
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return out


def device_names(client: Client) -> dict[str, str]:
    """Every device's name by id."""
    return {i: d["name"] for i, d in devices_by_id(client).items()}


def _outcome(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return "skipped"
    if "status" in r:
        return str(r["status"]) + (" (in sync)" if r.get("in_sync") else "")
    if "ok" in r:
        return "ok" if r["ok"] else "failed"
    return str(r.get("state") or "-")


def _why(r: dict[str, Any]) -> str:
    err = r.get("error")
    if isinstance(err, dict):
        reason = err.get("reason") or err.get("code")
        return f"{reason}: {err.get('message')}" if reason else str(err.get("message"))
    if r.get("skipped"):
        return str(r["skipped"])
    if r.get("message"):
        return str(r["message"])
    if r.get("level_name") is not None:
        return f"level {r.get('level')} {r['level_name']}"
    if r.get("privilege"):
        return f"privilege {r['privilege']}, {r.get('arch', '')}".rstrip(", ")
    if r.get("changed_tasks"):
        return "changed: " + ", ".join(r["changed_tasks"])
    return ""


def job_detail(console: Console, client: Client, job: dict[str, Any]) -> None:
    """A job: kind, state, times, progress, error; per-target outcome and reason; drift diffs."""
    console.print(f"[bold]{job['kind']}[/bold] job {job['id']}  {_state(job['state'])}  {percent(job['progress'])}")
    times = [f"created {human_time(job.get('created_at'))} by {job.get('created_by') or '-'}"]
    if job.get("started_at"):
        times.append(f"started {human_time(job['started_at'])}")
    if job.get("finished_at"):
        took = job["finished_at"] - (job.get("started_at") or job["created_at"])
        times.append(f"finished {human_time(job['finished_at'])} (took {took:.1f} s)")
    console.print("  " + ", ".join(times))
    params = {k: v for k, v in (job.get("params") or {}).items() if k in ("playbook", "check", "target", "python")}
    if params:
        console.print("  " + "  ".join(f"{k}={v}" for k, v in params.items()))
    if job.get("error"):
        console.print(f"  [red]error[/red]: {escape(str(job['error'].get('message')))}")
    results = job.get("results") or {}
    if results:
        names = device_names(client)
        rows = [
            {"device": names.get(t, r.get("name") or "-"), "id": t, "outcome": _outcome(r), "why": _why(r)}
            for t, r in sorted(results.items(), key=lambda tr: names.get(tr[0], tr[0]))
        ]
        show(console, table(rows, ["device", "id", "outcome", "why"]))
        for t, r in results.items():
            drift = r.get("drift") or []
            if drift:
                console.print(f"[bold]drift on {escape(names.get(t, t))}[/bold]: {len(drift)} task(s) would change")
                for change in drift:
                    console.print(f"  • {escape(str(change.get('task')))} ({escape(str(change.get('action')))})")
                    if change.get("diff"):
                        console.print(str(change["diff"]).rstrip(), markup=False, highlight=False, soft_wrap=True)
    summary = {k: v for k, v in (job.get("summary") or {}).items() if not isinstance(v, dict | list)}
    if summary:
        console.print("  summary: " + "  ".join(f"{k}={v}" for k, v in summary.items()))


def cluster_detail(console: Console, client: Client, cl: dict[str, Any]) -> None:
    """A cluster: profile, level against its target, labels, vars; each member's state and level."""
    console.print(
        f"[bold]{escape(cl['name'])}[/bold] {cl['id']}  profile {cl['profile']}  "
        f"level {cl.get('level')} of target {cl.get('target_level')}  ({cl.get('size', 0)} members)"
    )
    if cl.get("labels"):
        console.print("  labels: " + ", ".join(f"{k}={v}" for k, v in cl["labels"].items()))
    for playbook, values in (cl.get("vars") or {}).items():
        console.print(f"  vars {escape(playbook)}: {escape(json.dumps(values))}")
    members = client.get("/api/v1/devices", cluster=cl["id"], limit=500)["items"]
    server = cl.get("server_id")
    rows = [{**m, "role": "server" if m["id"] == server else "", "last_seen": m.get("last_seen")} for m in members]
    if rows:
        show(console, table(rows, ["name", "id", "state", "level", "privilege", "role", "last_seen"]))
    else:
        console.print("  no members yet: `evc cluster add CLUSTER DEVICE`")


def health_detail(console: Console, client: Client, job: dict[str, Any]) -> None:
    """A health sweep: every device by name, its state, and why it is not online (the
    thresholds it breaches, or why it could not be checked)."""
    devices = devices_by_id(client)
    rows = []
    for dev_id, r in (job.get("results") or {}).items():
        dev = devices.get(dev_id) or {}
        state = r.get("state") or dev.get("state") or "-"
        breaches = (dev.get("health") or {}).get("breaches") or []
        why = "; ".join(breaches) if r.get("ok") else _why(r)
        rows.append({"device": dev.get("name", dev_id), "id": dev_id, "state": state,
                     "why": why or ("ok" if state == "online" else "")})  # fmt: skip
    rows.sort(key=lambda r: (r["state"] == "online", r["device"]))
    if rows:
        show(console, table(rows, ["device", "id", "state", "why"]))
    states = (job.get("summary") or {}).get("states") or {}
    line = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    console.print(f"{len(rows)} device(s) checked" + (f": {line}" if line else ""))


def event_row(ev: dict[str, Any]) -> dict[str, Any]:
    return {**ev, "device": ev.get("name") or ev.get("device")}


def follow_events(
    console: Console,
    client: Client,
    recent: list[dict[str, Any]],
    etype: str | None,
    device: str | None,
    follow_s: float | None,
    *,
    as_json: bool = False,
    poll: float = 1.0,
) -> None:
    """Print *recent* (oldest first), then every new event as it arrives, one line each, until
    *follow_s* seconds have passed (or Ctrl-C)."""

    def key(ev: dict[str, Any]) -> str:
        return json.dumps(ev, sort_keys=True)

    def show(ev: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(ev), flush=True)  # noqa: T201 - one JSON line per event, never wrapped
            return
        r = event_row(ev)
        change = f" {r.get('from')} → {r.get('to')}" if r.get("to") else ""
        reason = f" ({r['reason']})" if r.get("reason") else ""
        stamp = time.strftime("%H:%M:%S", time.localtime(float(r.get("ts") or 0)))
        console.print(f"{stamp} {r.get('type')} {r.get('device') or ''}{change}{reason}", markup=False)

    seen: set[str] = set()
    last = 0.0
    for ev in reversed(recent):
        show(ev)
        seen.add(key(ev))
        last = max(last, float(ev.get("ts") or 0))
    deadline = time.monotonic() + follow_s if follow_s is not None else None
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
            page = client.get("/api/v1/events", type=etype, device=device, since=last or None, limit=500)
            for ev in reversed(page["items"]):
                k = key(ev)
                if k in seen:
                    continue
                seen.add(k)
                last = max(last, float(ev.get("ts") or 0))
                show(ev)
    except KeyboardInterrupt:
        return


__all__ = [
    "EVENT_COLUMNS",
    "cluster_detail",
    "device_names",
    "devices_by_id",
    "event_row",
    "follow_events",
    "health_detail",
]
