"""How the `evc` command shows things to a person: times, tables that never cut an id, names
accepted wherever ids are. (``--json`` output bypasses all of this and keeps raw values.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import click
from click.shell_completion import CompletionItem
from rich import box
from rich.console import Console
from rich.table import Table

from evc.client import APIError, Client

#: columns that hold identifiers: never wrapped, never cut
IDENTIFIERS = frozenset(
    {"id", "name", "target", "device", "job", "cluster", "server_id", "device_id", "actor", "created_by"}
)
#: columns that hold epoch times
TIMES = frozenset({"ts", "last_seen", "checked_at"})


def is_time_column(col: str) -> bool:
    return col in TIMES or col.endswith("_at")


def human_time(ts: Any, now: float | None = None) -> str:
    """An epoch time for a person: ``12s ago``, ``3m ago``, ``5h ago``, ``in 10m``; older than a
    day (or further ahead), the date and time in the local zone (ISO, to the minute)."""
    if ts is None or ts == "":
        return "-"
    try:
        t = float(ts)
    except (TypeError, ValueError):
        return str(ts)
    delta = (time.time() if now is None else now) - t
    ahead = delta < 0
    d = abs(delta)
    if d >= 86400:
        return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    if d < 60:
        amount = f"{int(d)}s"
    elif d < 3600:
        amount = f"{int(d // 60)}m"
    else:
        amount = f"{int(d // 3600)}h{int(d % 3600 // 60):02d}m"
    return f"in {amount}" if ahead else f"{amount} ago"


def cell(col: str, v: Any) -> str:
    """A table cell: times human, lists and mappings compact, None as ``-``."""
    if v is None:
        return "-"
    if is_time_column(col) and isinstance(v, int | float):
        return human_time(v)
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def table(rows: Iterable[dict[str, Any]], cols: list[str], title: str | None = None) -> Table:
    """A table whose identifier columns are as wide as their longest value (never cut, never
    wrapped) and whose other columns keep at least their heading's width (or 12) and wrap
    beyond it, folding long words, never cutting them. Print it with :func:`show` so that a
    terminal too narrow for that widens the output rather than cutting an id."""
    rows = list(rows)
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for col in cols:
        longest = max([len(col), *(len(cell(col, r.get(col))) for r in rows)])
        if col in IDENTIFIERS:
            t.add_column(col, no_wrap=True, min_width=longest)
        else:
            t.add_column(col, overflow="fold", min_width=min(longest, max(len(col), 12)))
    for r in rows:
        t.add_row(*[cell(col, r.get(col)) for col in cols])
    return t


def min_width(t: Table) -> int:
    """The narrowest *t* can be drawn without cutting what :func:`table` protects."""
    return sum(int(c.min_width or 1) for c in t.columns) + 2 * (len(t.columns) - 1) + 1


def show(console: Console, t: Table) -> None:
    """Print a :func:`table`, wider than the terminal when it must be (the terminal wraps the
    lines; nothing is cut)."""
    console.print(t, width=max(console.width, min_width(t)), crop=False)


def percent(progress: dict[str, Any]) -> str:
    """``done/total (NN%)``, never past 100 %."""
    total = max(int(progress.get("total") or 1), 1)
    done = min(int(progress.get("done") or 0), total)
    return f"{done}/{total} ({min(100.0, float(progress.get('percent') or 100.0 * done / total)):.0f}%)"


# -- names wherever ids are ----------------------------------------------------------------------


def resolve(client: Client, kind: str, ref: str) -> str:
    """The id of the device or cluster *ref* names (an id is returned as it is)."""
    prefix = {"device": "dev_", "cluster": "cl_"}[kind]
    if ref.startswith(prefix):
        return ref
    if kind == "device":
        items = client.get("/api/v1/devices", name=ref, limit=500)["items"]
    else:
        items = client.get("/api/v1/clusters", limit=500)["items"]
    for item in items:
        if item.get("name") == ref:
            return str(item["id"])
    raise click.BadParameter(f"no {kind} is named {ref!r} (and it is no {kind} id)")


class Ref(click.ParamType):
    """A command-line value that is a device or cluster id, or its name."""

    def __init__(self, kind: str, client_of: Callable[[click.Context], Client | None]) -> None:
        self.kind = kind
        self.name = f"{kind.upper()}"
        self._client_of = client_of

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        value = str(value)
        client = self._client_of(ctx) if ctx is not None else None
        if client is None:
            return value
        try:
            return resolve(client, self.kind, value)
        except APIError:
            return value  # (the command itself reports what the API says)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
        """Complete device and cluster names from the API (nothing when it cannot be reached)."""
        client = self._client_of(ctx)
        if client is None:
            return []
        client.timeout = 3.0
        try:
            if self.kind == "device":
                items = client.get("/api/v1/devices", name=incomplete or None, limit=500)["items"]
            else:
                items = client.get("/api/v1/clusters", limit=500)["items"]
        except APIError:
            return []
        return [CompletionItem(i["name"]) for i in items if str(i["name"]).startswith(incomplete)]


__all__ = ["Ref", "cell", "human_time", "min_width", "percent", "resolve", "show", "table"]
