"""The one adapter around ansible-runner: run a playbook, stream its events, sum up per host."""

from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import ansible_runner

from evc import QUIET_WARNINGS
from evc.provisioning.inventory import Inventory

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: runner events about one host's result of one task
HOST_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}
ITEM_EVENTS = {
    "runner_item_on_ok": "ok",
    "runner_item_on_failed": "failed",
    "runner_item_on_skipped": "skipped",
}
#: events whose only content is a line of Ansible's display (warnings, verbose output)
TEXT_EVENTS = frozenset({"verbose", "warning", "deprecated", "error", "debug", "system_warning"})
#: the per-host counters of a playbook's stats, as EVC names them
STATS_KEYS = {
    "ok": "ok",
    "changed": "changed",
    "failures": "failed",
    "dark": "unreachable",
    "skipped": "skipped",
    "rescued": "rescued",
    "ignored": "ignored",
}
MESSAGE_MAX = 500
DIFF_MAX = 2000


class EventSink(Protocol):
    """Where translated events go (a :class:`evc.jobs.JobRun`): one call per batch."""

    def events(self, events: list[JSON]) -> int: ...


@dataclass(frozen=True)
class PlaybookRun:
    """What to run, where and how."""

    playbook: Path
    inventory: Inventory
    ident: str
    extra_vars: JSON = field(default_factory=dict)
    forks: int = 20
    check: bool = False
    limit: Sequence[str] = ()
    timeout_s: int | None = None
    connect_timeout_s: float = 10.0
    secrets: Sequence[str] = ()


@dataclass
class HostResult:
    """One host's summary of a run: Ansible's counters plus what EVC reports from events."""

    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0
    changed_tasks: list[JSON] = field(default_factory=list)
    facts: JSON | None = None
    message: str = ""

    @property
    def status(self) -> str:
        if self.unreachable:
            return "unreachable"
        if self.failed:
            return "failed"
        return "ok"

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in STATS_KEYS.values()}


@dataclass
class RunOutcome:
    """How a run ended: runner status and rc, per-host results, how many events were streamed."""

    status: str
    rc: int | None
    hosts: dict[str, HostResult]
    events: int
    duration_s: float
    error: str = ""
    completed: bool = True  # the playbook reached its stats: every host's counters are final

    @property
    def cancelled(self) -> bool:
        return self.status == "canceled"


def _short(text: Any, limit: int = MESSAGE_MAX) -> str:
    s = text if isinstance(text, str) else json.dumps(text, default=str)
    s = s.strip()
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _message(res: JSON, status: str) -> str:
    if not isinstance(res, dict):
        return ""
    if status in ("failed", "unreachable"):
        for key in ("msg", "stderr", "reason", "module_stderr", "stdout"):
            val = res.get(key)
            if val:
                return _short(val)
        return ""
    val = res.get("msg")
    return _short(val) if isinstance(val, str) and val else ""


def _diff_text(diff: Any) -> str:
    """A short unified diff from a module's ``diff`` result (a dict or a list of them)."""
    parts: list[str] = []
    for d in diff if isinstance(diff, list) else [diff]:
        if not isinstance(d, dict):
            continue
        if d.get("prepared"):
            parts.append(str(d["prepared"]))
            continue
        before, after = d.get("before", ""), d.get("after", "")
        if not isinstance(before, str):
            before = json.dumps(before, indent=1, sort_keys=True, default=str) + "\n"
        if not isinstance(after, str):
            after = json.dumps(after, indent=1, sort_keys=True, default=str) + "\n"
        parts.append(
            "".join(
                difflib.unified_diff(
                    before.splitlines(keepends=True),
                    after.splitlines(keepends=True),
                    str(d.get("before_header") or "before"),
                    str(d.get("after_header") or "after"),
                )
            )
        )
    return _short("".join(parts), DIFF_MAX) if parts else ""


def _event_header(ev: JSON, name: str, data: JSON) -> JSON:
    """The fields every translated event has: its name, counter, when Ansible emitted it (not
    when the batch reached Redis), and the play, task, action and host it is about."""
    out: JSON = {"type": "ansible", "event": name, "counter": ev.get("counter")}
    created = ev.get("created")
    if isinstance(created, str):
        try:
            when = datetime.fromisoformat(created)
            if when.tzinfo is None:  # the callback plugin writes UTC without an offset
                when = when.replace(tzinfo=UTC)
            out["ts"] = when.timestamp()
        except ValueError:
            pass
    if data.get("play"):
        out["play"] = data["play"]
    if data.get("task"):
        out["task"] = data["task"]
    if data.get("task_action"):
        out["action"] = data["task_action"]
    host = data.get("host")
    if host:
        out["host"] = host
    return out


class EventStream:
    """The runner's event handler: translates every event, tallies hosts, pushes in batches."""

    def __init__(
        self,
        sink: EventSink,
        batch: int = 256,
        max_delay_s: float = 0.25,
        secrets: Sequence[str] = (),
    ) -> None:
        self.sink = sink
        self.batch = batch
        self.max_delay_s = max_delay_s
        self.secrets = [s for s in secrets if s]
        self.hosts: dict[str, HostResult] = {}
        self.stats: JSON | None = None
        self.count = 0
        self._item_errors: dict[str, str] = {}
        self._diffs: set[tuple[Any, Any]] = set()
        self.error = ""  # the last error Ansible displayed (a syntax error, a missing file)
        self._buf: list[JSON] = []
        self._last_flush = time.monotonic()

    def host(self, name: str) -> HostResult:
        hr = self.hosts.get(name)
        if hr is None:
            hr = self.hosts[name] = HostResult()
        return hr

    def _redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "********")
        return text

    def translate(self, ev: JSON) -> JSON:
        """One EVC job event from one runner event (never from its stdout text, except the
        text-only events whose stdout *is* their content)."""
        name = str(ev.get("event") or "")
        data: JSON = ev.get("event_data") or {}
        out = _event_header(ev, name, data)
        host = data.get("host")
        raw = data.get("res")
        res: JSON = raw if isinstance(raw, dict) else {}
        if name in HOST_EVENTS or name in ITEM_EVENTS:
            self._host_event(name, data, res, out)
        elif name == "runner_on_file_diff":
            self._diffs.add((host, data.get("task_uuid")))  # its content is never copied
        elif name == "runner_on_start":
            out["status"] = "started"
        elif name == "runner_retry":
            out["status"] = "retry"
            out["message"] = f"retrying ({res.get('attempts', '?')}/{res.get('retries', '?')})"
        elif name == "playbook_on_stats":
            self.stats = {k: data.get(k) or {} for k in STATS_KEYS}
            out["hosts"] = {h: hr.counts() for h, hr in self.apply_stats().items()}
        elif name in TEXT_EVENTS:
            text = str(ev.get("stdout") or "").strip()
            if text:
                out["message"] = self._redact(_short(text))
                if name == "error" or text.startswith(("ERROR!", "[ERROR]")):
                    self.error = out["message"]
        return out

    def _host_event(self, name: str, data: JSON, res: JSON, out: JSON) -> None:
        """A host's (or a loop item's) result of a task: its status, message and item into
        *out*; a host's result is tallied, a failed item's message kept for the host's."""
        host = data.get("host")
        status = HOST_EVENTS.get(name) or ITEM_EVENTS[name]
        changed = bool(res.get("changed")) if status == "ok" else False
        if "censored" in res:  # no_log: Ansible drops "changed"; a file diff still tells
            out["censored"] = True
            changed = status == "ok" and (host, data.get("task_uuid")) in self._diffs
        if status == "failed" and data.get("ignore_errors"):
            status = "ignored"
        out["status"] = "changed" if changed else status
        out["changed"] = changed
        msg = _message(res, status if status != "ignored" else "failed")
        if msg:
            out["message"] = self._redact(msg)
        if name in ITEM_EVENTS:
            item = res.get("_ansible_item_label", res.get("item"))
            if item is not None:
                out["item"] = self._redact(_short(item, 200))
            if status == "failed" and host and msg:
                self._item_errors[host] = f"item {out.get('item', '?')}: {out['message']}"
        elif host:
            self._tally(host, status, changed, res, out)

    def _tally(self, host: str, status: str, changed: bool, res: JSON, out: JSON) -> None:
        hr = self.host(host)
        if status == "ok":
            hr.ok += 1
            if changed:
                hr.changed += 1
                change: JSON = {"task": out.get("task", ""), "action": out.get("action", "")}
                diff = _diff_text(res.get("diff")) if res.get("diff") else ""
                if diff:
                    change["diff"] = self._redact(diff)
                hr.changed_tasks.append(change)
            facts = (res.get("ansible_facts") or {}).get("evc_facts")
            if isinstance(facts, dict):
                hr.facts = facts
            elif isinstance(facts, str):  # the registration probe's key=value lines
                hr.facts = {"probe": facts}
        elif status == "failed":
            hr.failed += 1
            msg = out.get("message", "")
            if msg == "One or more items failed" and host in self._item_errors:
                msg = self._item_errors.pop(host)
            hr.message = msg or f"task {out.get('task', '?')!r} failed"
        elif status == "ignored":
            hr.ignored += 1
        elif status == "unreachable":
            hr.unreachable += 1
            hr.message = out.get("message", "") or "unreachable"
        elif status == "skipped":
            hr.skipped += 1

    def apply_stats(self) -> dict[str, HostResult]:
        """Ansible's own counters replace the tallies where the stats event has them."""
        stats = self.stats or {}
        names = {h for per in stats.values() for h in per}
        for h in names:
            hr = self.host(h)
            for src, dst in STATS_KEYS.items():
                setattr(hr, dst, int(stats.get(src, {}).get(h, 0)))
        return {h: self.hosts[h] for h in sorted(names)}

    def __call__(self, ev: JSON) -> bool:
        self._buf.append(self.translate(ev))
        self.count += 1
        if len(self._buf) >= self.batch or time.monotonic() - self._last_flush >= self.max_delay_s:
            self.flush()
        return False  # keep nothing on disk: the job's events are the record

    def add(self, event: JSON) -> None:
        self._buf.append(event)

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._buf:
            batch, self._buf = self._buf, []
            self.sink.events(batch)

    def flush_if_stale(self) -> None:
        if self._buf and time.monotonic() - self._last_flush >= self.max_delay_s:
            self.flush()


def runner_env(spec: PlaybookRun) -> dict[str, str]:
    """The Ansible environment of a run; the ``ansible-playbook`` next to this interpreter (a
    virtualenv's) comes first on PATH, so a worker started without activating it finds it."""
    env = spec.inventory.env(spec.connect_timeout_s)
    env["ANSIBLE_ROLES_PATH"] = str(spec.playbook.parent / "roles")
    # a deprecation ansible-core's imports trigger would be the first "verbose" event of every run
    env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), QUIET_WARNINGS]))
    bindir = Path(sys.executable).parent
    if (bindir / "ansible-playbook").exists():
        env["PATH"] = os.pathsep.join([str(bindir), os.environ.get("PATH", os.defpath)])
    return env


def run_playbook(
    spec: PlaybookRun,
    sink: EventSink,
    cancelled: Callable[[], bool] | None = None,
    on_status: Callable[[str], None] | None = None,
    cancel_poll_s: float = 0.5,
) -> RunOutcome:
    """Run *spec* through ansible-runner with ``ident`` = the job's id; every event goes to
    *sink* in batches, *cancelled* is polled to stop the run, *on_status* sees runner states."""
    stream = EventStream(sink, secrets=spec.secrets)
    control = _RunControl(stream, spec.ident, cancelled, on_status, cancel_poll_s)
    cmdline = ["-e", f"@{spec.inventory.internal_vars_path}"]
    if spec.check:
        cmdline += ["--check", "--diff"]
    started = time.monotonic()
    r = ansible_runner.run(
        private_data_dir=str(spec.inventory.root / "runner"),
        project_dir=str(spec.playbook.parent),
        playbook=spec.playbook.name,
        inventory=str(spec.inventory.inventory_path),
        ident=spec.ident,
        extravars=dict(spec.extra_vars),
        envvars=runner_env(spec),
        forks=spec.forks,
        limit=",".join(spec.limit) or None,
        cmdline=" ".join(shlex.quote(a) for a in cmdline),
        event_handler=stream,
        status_handler=control.status_handler,
        cancel_callback=control.cancel_callback,
        settings={"pexpect_timeout": 0.2, "suppress_ansible_output": True},
        fact_cache_type="memory",
        timeout=spec.timeout_s,
        quiet=True,
    )
    stream.flush()
    return _outcome(stream, str(r.status), r.rc, time.monotonic() - started)


class _RunControl:
    """ansible-runner's cancel and status callbacks for one run: polls *cancelled* at most
    every *poll_s* (latched once true), flushes the stream's stale events meanwhile."""

    def __init__(
        self,
        stream: EventStream,
        ident: str,
        cancelled: Callable[[], bool] | None,
        on_status: Callable[[str], None] | None,
        poll_s: float,
    ) -> None:
        self.stream, self.ident, self.cancelled, self.on_status, self.poll_s = (
            stream,
            ident,
            cancelled,
            on_status,
            poll_s,
        )
        self.last_poll = 0.0
        self.stop = False  # latched: the runner asks again on every loop and must keep hearing yes

    def cancel_callback(self) -> bool:
        self.stream.flush_if_stale()
        if self.stop or self.cancelled is None or time.monotonic() - self.last_poll < self.poll_s:
            return self.stop
        self.last_poll = time.monotonic()
        try:
            self.stop = bool(self.cancelled())
        except Exception:  # a store hiccup must not kill the run
            log.exception("cancel check failed for %s", self.ident)
        return self.stop

    def status_handler(self, data: JSON, runner_config: Any = None) -> None:
        status = str(data.get("status"))
        self.stream.add({"type": "ansible", "event": "status", "status": status})
        if status != "starting":
            self.stream.flush()
        if self.on_status is not None:
            self.on_status(status)


def _outcome(stream: EventStream, status: str, rc: int | None, duration_s: float) -> RunOutcome:
    """How the run ended, per host: Ansible's stats where it reached them, else the tallies."""
    hosts = stream.apply_stats() if stream.stats else {}
    for name, hr in stream.hosts.items():
        hosts.setdefault(name, hr)
    return RunOutcome(
        status=status,
        rc=rc,
        hosts=hosts,
        events=stream.count,
        duration_s=duration_s,
        error=stream.error,
        completed=stream.stats is not None,
    )
