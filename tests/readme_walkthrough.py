"""Extract the README's walkthrough and run it as one shell session, step by step.

A walkthrough block is a fenced ``sh`` block right after a ``<!-- walkthrough -->`` line. In it:

- each command is a line (``\\`` continues it on the next line); ``#`` lines are comments;
- ``# expect: REGEX`` right after a command: its output (stdout and stderr) must match REGEX;
- a command that carries ``# not run by the README test: REASON`` is shown to readers but not run,
  and the reason is reported (nothing is skipped silently).

All commands run in one bash process, in order, so variables set by one step are seen by the next;
each step's output and exit status are recorded, and the session stops at the first failure.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MARK = "<!-- walkthrough -->"
NOT_RUN = re.compile(r"#\s*not run by the README test:\s*(?P<why>.+)$")
EXPECT = re.compile(r"^#\s*expect:\s*(?P<rx>.+)$")


@dataclass
class Step:
    command: str
    line: int
    expect: list[str] = field(default_factory=list)
    not_run: str = ""


@dataclass
class Outcome:
    step: Step
    rc: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and all(re.search(rx, self.output, re.M) for rx in self.step.expect)


def blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every walkthrough block, in order."""
    lines = text.splitlines()
    out: list[tuple[int, list[str]]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == MARK:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j >= len(lines) or not lines[j].startswith("```sh"):
                raise ValueError(f"README line {i + 1}: {MARK} must be followed by a ```sh block")
            k = j + 1
            while k < len(lines) and not lines[k].startswith("```"):
                k += 1
            out.append((j + 2, lines[j + 1 : k]))
            i = k
        i += 1
    return out


def steps(text: str) -> list[Step]:
    """The walkthrough's commands, in order, with their expectations."""
    result: list[Step] = []
    for first, lines in blocks(text):
        pending = ""
        start = first
        for n, raw in enumerate(lines, first):
            line = raw.rstrip()
            if pending:
                pending += "\n" + line
            elif not line.strip():
                continue
            elif line.lstrip().startswith("#"):
                m = EXPECT.match(line.strip())
                if m:
                    if not result:
                        raise ValueError(f"README line {n}: '# expect:' before any command")
                    result[-1].expect.append(m["rx"].strip())
                continue
            else:
                pending, start = line, n
            if pending.endswith("\\"):
                continue
            m = NOT_RUN.search(pending)
            result.append(Step(pending, start, not_run=m["why"].strip() if m else ""))
            pending = ""
        if pending:
            raise ValueError(f"README line {start}: a command ends in a line continuation")
    return result


def driver(run: list[Step], out_dir: Path) -> str:
    """A bash script that runs *run* in order, recording each step's output and status."""
    parts = ["set -u", "set -o pipefail"]
    for i, st in enumerate(run):
        out = shlex.quote(str(out_dir / f"{i}.out"))
        rc = shlex.quote(str(out_dir / f"{i}.rc"))
        parts.append(f"{{\n{st.command}\n}} >{out} 2>&1 </dev/null\nrc=$?\necho $rc >{rc}\n[ $rc -eq 0 ] || exit $rc")
    return "\n".join(parts) + "\n"


def execute(
    run: list[Step], workdir: Path, env: dict[str, str], out_dir: Path, timeout: float
) -> tuple[list[Outcome], subprocess.CompletedProcess[bytes]]:
    """Run the steps in one bash session; outcomes for the steps that ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "walkthrough.sh"
    script.write_text(driver(run, out_dir))
    proc = subprocess.Popen(["bash", str(script)], cwd=workdir, env=env, start_new_session=True)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # background steps (`… &`) end with the session
        except ProcessLookupError:
            pass
        proc.wait()
    outcomes: list[Outcome] = []
    for i, st in enumerate(run):
        rcf = out_dir / f"{i}.rc"
        outf = out_dir / f"{i}.out"
        output = outf.read_text(errors="replace") if outf.exists() else ""
        if not rcf.exists():
            if outf.exists():  # the step that was running when the session ended or timed out
                outcomes.append(Outcome(st, None, output))
            break
        outcomes.append(Outcome(st, int(rcf.read_text()), output))
    return outcomes, subprocess.CompletedProcess(["bash", str(script)], proc.returncode)
