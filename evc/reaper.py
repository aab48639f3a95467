"""Process-tree housekeeping for `evc up`: adopt what its children leave behind, and end it.

Programs started on simulated devices (exporters, FL clients, their supervisors) detach on
purpose (``setsid``, ``nohup ... &``), and so do helpers such as SSH control masters: when
their parent ends they would be re-parented to PID 1 and outlive the stack. A process that
made itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``, Linux 3.4+) adopts them instead,
so it can reap them while it runs and end them when it stops. Linux only; elsewhere
:func:`become_subreaper` returns False and nothing is adopted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
PROC = Path("/proc")


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants; True when the kernel agreed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str


def read_stat(text: str) -> ProcInfo:
    """Parse one ``/proc/<pid>/stat`` line (the command name may hold spaces and parentheses)."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return ProcInfo(pid=int(head.split("(", 1)[0]), ppid=int(fields[1]), state=fields[0])


def processes() -> list[ProcInfo]:
    """Every process visible in /proc (those that end while being read are skipped)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            out.append(read_stat((entry / "stat").read_text()))
    return out


def descendants(root: int, table: Collection[ProcInfo]) -> list[ProcInfo]:
    """The processes below *root* in *table*, parents before children."""
    children: dict[int, list[ProcInfo]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p)
    out: list[ProcInfo] = []
    todo = [root]
    while todo:
        for p in children.get(todo.pop(), []):
            out.append(p)
            todo.append(p.pid)
    return out


def adopted(known: Collection[int]) -> list[ProcInfo]:
    """This process's children that it did not start itself (not in *known*)."""
    me = os.getpid()
    return [p for p in processes() if p.ppid == me and p.pid not in known]


def reap_adopted(known: Collection[int]) -> int:
    """Collect the exit status of adopted children that have ended; how many were reaped."""
    n = 0
    for p in adopted(known):
        if p.state in ("Z", "X"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)
                n += 1
    return n


def end_adopted(known: Collection[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then after *grace_s* SIGKILL, every process below this one that is not in
    *known* (nor below it), until none is left; returns the pids that were signalled."""
    me = os.getpid()
    signalled: list[int] = []
    sent: dict[int, int] = {}
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while True:
        table = processes()
        keep = set(known)
        for k in known:
            keep.update(p.pid for p in descendants(k, table))
        targets = [p for p in descendants(me, table) if p.pid not in keep]
        live = [p for p in targets if p.state not in ("Z", "X")]
        reap_adopted(known)
        if not targets:
            return signalled
        for p in live:
            if sent.get(p.pid) == sig:
                continue
            sent[p.pid] = sig
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, sig)
                if p.pid not in signalled:
                    signalled.append(p.pid)
        if time.monotonic() > deadline + grace_s:  # unkillable or not ours to reap: give up
            return signalled
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.05)
