"""Resumable, digest-verified shipping of one file to a device over SFTP.

The file goes to ``<dest>.part`` in pipelined SFTP writes (up to ``max_requests`` blocks in
flight, so the transfer runs near the wire's speed), and is renamed to ``<dest>`` only after the
sha256 of the whole ``.part``, computed on the device by the device's Python, matches: the
device hashes the ``.part`` while it arrives (a little behind the writes in flight), so the
check costs little time after the last byte; should that digest differ (a write that landed
behind the hasher), the whole file is hashed again before anything is concluded. Where a
``<dest>`` or a ``.part`` is there already (an SFTP stat tells), the device reports first, in
one pass over its files:

* the sha256 of ``<dest>`` when it exists: the right digest there means nothing is sent again;
* the size of ``<dest>.part`` and the sha256 of its prefixes at every ``SEGMENT`` boundary. The
  upload resumes at the largest boundary whose prefix digest equals the local one, so a
  connection dropped half-way re-sends at most one segment plus what was in flight, while a
  ``.part`` that is corrupted (or has holes left by writes that never landed) is re-sent from
  the first boundary where it differs: from 0 when its start is wrong.

A dropped connection raises :class:`~evc.errors.ConnectionDropped` (retryable: the next attempt
resumes); a digest that does not match after the upload raises :class:`DigestMismatch` and
removes the ``.part``, so the next attempt starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import posixpath
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import asyncssh

from evc import ssh
from evc.errors import CommandFailed, ConnectionDropped
from evc.fl.channels import sftp_path, shell_path
from evc.settings import Settings

#: the prefix digests of a ``.part`` are compared at multiples of this many bytes
SEGMENT = 1 << 20
#: SFTP write requests in flight at once
MAX_REQUESTS = 16
#: bytes per SFTP write request (less where the server announces a lower limit): a request and
#: its header fill four SSH channel packets of 32 KiB (OpenSSH's and asyncssh's packet size)
#: exactly, so no small packet follows each request; with MAX_REQUESTS, 2 MiB in flight, as
#: OpenSSH's sftp/scp (64 x 32 KiB)
BLOCK_SIZE = 4 * 32768 - 512

#: run by the device's Python (-S: these scripts need the standard library only, and start
#: faster without site): argv = dest, part, segment, check_dest (1: hash dest). Prints one
#: JSON line.
PROBE = r"""
import hashlib, json, os, sys
dest, part, seg, check_dest = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
out = {"dest": None, "part_size": None, "marks": []}
if check_dest and os.path.isfile(dest):
    out["dest"] = digest(dest)
if os.path.isfile(part):
    out["part_size"] = os.path.getsize(part)
    h, done = hashlib.sha256(), 0
    with open(part, "rb") as f:
        while True:
            b = f.read(seg)
            if len(b) < seg:
                break
            h.update(b)
            done += seg
            out["marks"].append(h.hexdigest())
print(json.dumps(out))
"""

#: run by the device's Python: argv = part, dest, expected sha256. Renames part to dest when
#: its digest matches (else removes it). Prints one JSON line.
FINISH = r"""
import hashlib, json, os, sys
part, dest, want = sys.argv[1], sys.argv[2], sys.argv[3]
h = hashlib.sha256()
with open(part, "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
got = h.hexdigest()
if got == want:
    os.replace(part, dest)
else:
    os.remove(part)
print(json.dumps({"sha256": got, "ok": got == want}))
"""


#: run by the device's Python during the upload: argv = part (relative to the home), size, lag.
#: Hashes the part as it grows, staying *lag* bytes behind its end (writes in flight may land
#: out of order) until the client writes "done" on stdin (every write acknowledged), then reads
#: to the end and prints the sha256. stdin closed without "done": exits quietly.
STREAM = r"""
import hashlib, os, select, sys, time
part, size, lag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h, done, final, f = hashlib.sha256(), 0, False, None
while True:
    if not final and select.select([sys.stdin], [], [], 0)[0]:
        if sys.stdin.readline().strip() != "done":
            sys.exit(0)
        final = True
    if f is None:
        try:
            f = open(part, "rb")
        except FileNotFoundError:
            time.sleep(0.02)
            continue
    limit = size if final else min(size, os.fstat(f.fileno()).st_size - lag)
    if limit - done >= (1 << 20) or (final and done < limit):
        b = f.read(min(1 << 20, limit - done))
        if not b:
            break
        h.update(b)
        done += len(b)
    elif final:
        break
    else:
        select.select([sys.stdin], [], [], 0.02)
print(h.hexdigest())
"""
#: how far the device's hasher stays behind the end of the .part: twice the writes in flight
STREAM_LAG = 2 * MAX_REQUESTS * BLOCK_SIZE


async def _rename(sftp: asyncssh.SFTPClient, src: str, dst: str) -> None:
    try:
        await sftp.posix_rename(src, dst)
    except (asyncssh.SFTPOpUnsupported, asyncssh.SFTPFailure):
        with contextlib.suppress(asyncssh.SFTPError):
            await sftp.remove(dst)
        await sftp.rename(src, dst)


class DigestMismatch(CommandFailed):
    """The file on the device does not have the expected sha256 after the upload."""

    reason = "digest_mismatch"

    def __init__(self, got: str, message: str, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.got = got


@dataclass
class Payload:
    """The bytes to ship and their sha256; the prefix digests are computed only on a resume."""

    data: bytes
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = hashlib.sha256(self.data).hexdigest()

    @cached_property
    def marks(self) -> list[str]:
        """sha256 of ``data[:k * SEGMENT]`` for k = 1, 2, ... (whole segments only)."""
        h, out = hashlib.sha256(), []
        view = memoryview(self.data)
        for off in range(0, len(self.data) - SEGMENT + 1, SEGMENT):
            h.update(view[off : off + SEGMENT])
            out.append(h.hexdigest())
        return out

    def resume_offset(self, part_size: int | None, device_marks: list[str]) -> int:
        """Where to resume given the device's ``.part`` (0: start over)."""
        if not part_size or part_size > len(self.data):
            return 0
        good = 0
        for k, (mine, theirs) in enumerate(zip(self.marks, device_marks, strict=False), start=1):
            if mine != theirs:
                break
            good = k
        return good * SEGMENT


@dataclass
class ShipStats:
    """What one :func:`ship` did; updated while it runs (a caller sees it after a failure too).
    ``sent``: bytes handed to SFTP write requests in this attempt (acknowledged or not)."""

    size: int = 0
    sent: int = 0
    resumed_from: int = 0
    skipped: bool = False
    #: how the digest was checked on the device: "stream" (hashed while it arrived), "rehash"
    #: (the whole file read again after the upload), "" (skipped, or not got that far)
    verified: str = ""
    part_size: int | None = None


Progress = Callable[[int, int], None]


def _dropped(exc: BaseException, target: ssh.Target, stage: str) -> ConnectionDropped:
    return ConnectionDropped(
        f"the connection to {target.address} dropped during {stage}: {exc}", device_id=target.device_id
    )


_LOST = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.ConnectionLost, asyncssh.DisconnectError,
         asyncssh.ChannelOpenError, BrokenPipeError, ConnectionResetError)  # fmt: skip


async def _script(conn: asyncssh.SSHClientConnection, target: ssh.Target, settings: Settings, python: str,
                  script: str, *args: str | int) -> dict[str, object]:  # fmt: skip
    argv = " ".join(shell_path(a) if isinstance(a, str) else shlex.quote(str(a)) for a in args)
    res = await ssh.run(conn, f"{shell_path(python)} -S - {argv}", target, settings, input=script, check=False)
    lines = [x for x in str(res.stdout or "").splitlines() if x.strip()]
    if res.exit_status != 0 or not lines:
        err = [x for x in str(res.stderr or "").splitlines() if x.strip()]
        raise CommandFailed(
            f"{python} on {target.address} could not check {args[0]}: "
            f"{err[-1] if err else f'exit status {res.exit_status}'}",
            exit_status=res.exit_status, stderr=str(res.stderr or ""), device_id=target.device_id,
        )  # fmt: skip
    result: dict[str, object] = json.loads(lines[-1])
    return result


async def _size(sftp: asyncssh.SFTPClient, path: str) -> int | None:
    """The size of the regular file *path* on the device, None when there is none."""
    try:
        attrs = await sftp.stat(path)
    except asyncssh.SFTPNoSuchFile:
        return None
    if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
        return None
    return attrs.size


async def _upload(sftp: asyncssh.SFTPClient, part: str, payload: Payload, offset: int, stats: ShipStats,
                  progress: Progress | None, max_requests: int) -> None:  # fmt: skip
    data = payload.data
    size = len(data)
    async with sftp.open(part, "r+b" if offset else "wb", encoding=None) as fh:
        block = min(int(fh.write_len or BLOCK_SIZE), BLOCK_SIZE)
        slots = asyncio.Semaphore(max_requests)
        failures: list[BaseException] = []
        pending: set[asyncio.Task[None]] = set()

        async def one(off: int, chunk: bytes) -> None:
            try:
                await fh.write(chunk, off)
            except BaseException as exc:  # noqa: BLE001 - surfaced after the loop
                failures.append(exc)
            finally:
                slots.release()

        view = memoryview(data)
        for off in range(offset, size, block):
            await slots.acquire()
            if failures:
                slots.release()
                break
            chunk = bytes(view[off : min(off + block, size)])
            stats.sent += len(chunk)
            task = asyncio.create_task(one(off, chunk))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if progress is not None:
                progress(off + len(chunk), size)
        if pending:
            await asyncio.gather(*pending)
        if failures:
            raise failures[0]


async def _resume_point(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, target: ssh.Target,
                        settings: Settings, python: str, dest: str, payload: Payload,
                        st: ShipStats) -> tuple[bool, int | None]:  # fmt: skip
    """What is there already (SFTP stat: no process on the device when nothing is): sets
    ``st.skipped`` (the right *dest* is there) or ``st.resumed_from``; returns whether to skip
    and the size of the ``.part`` (None: none)."""
    part = dest + ".part"
    dest_size, part_size = await _size(sftp, sftp_path(dest)), await _size(sftp, sftp_path(part))
    if dest_size == st.size or part_size:
        check_dest = int(dest_size == st.size)
        probe = await _script(conn, target, settings, python, PROBE, dest, part, SEGMENT, check_dest)
        if probe.get("dest") == payload.sha256:
            st.skipped = True
            return True, part_size
        marks = probe.get("marks")
        st.part_size = part_size
        st.resumed_from = payload.resume_offset(part_size, [str(m) for m in marks] if isinstance(marks, list) else [])
    return False, part_size


async def _send(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, settings: Settings, python: str,
                part: str, payload: Payload, st: ShipStats, progress: Progress | None,
                max_requests: int) -> str:  # fmt: skip
    """Upload from ``st.resumed_from`` while the device hashes the .part as it arrives, a little
    behind the writes: returns the digest the device streamed."""
    argv = f"{shlex.quote(part if not part.startswith('~/') else part[2:])} {st.size} {STREAM_LAG}"
    hasher = await conn.create_process(f"{shell_path(python)} -S -c {shlex.quote(STREAM)} {argv}")
    try:
        await _upload(sftp, sftp_path(part), payload, st.resumed_from, st, progress, max_requests)
        hasher.stdin.write("done\n")
        return str(await asyncio.wait_for(hasher.stdout.read(), settings.ssh_command_timeout_s)).strip()
    finally:
        hasher.close()


async def ship(
    conn: asyncssh.SSHClientConnection,
    target: ssh.Target,
    settings: Settings,
    python: str,
    dest: str,
    payload: Payload,
    *,
    progress: Progress | None = None,
    stats: ShipStats | None = None,
    max_requests: int = MAX_REQUESTS,
) -> ShipStats:
    """Ship *payload* to *dest* (``~/`` paths are in the home) on the device, resuming a
    ``.part`` left by an earlier attempt; returns what was done. *python* runs the digests on the
    device. Raises :class:`ConnectionDropped` (retry: it resumes), :class:`DigestMismatch`,
    :class:`~evc.errors.CommandFailed` (e.g. the folder is not writable)."""
    st = stats if stats is not None else ShipStats()
    st.size = len(payload.data)
    part = dest + ".part"
    sdest, spart = sftp_path(dest), sftp_path(part)
    try:
        async with conn.start_sftp_client() as sftp:
            skip, part_size = await _resume_point(conn, sftp, target, settings, python, dest, payload, st)
            if skip:
                return st
            parent = posixpath.dirname(sdest)
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            if part_size is not None:  # what follows the resume point is sent again: drop it
                await sftp.truncate(spart, st.resumed_from)
            streamed = await _send(conn, sftp, settings, python, part, payload, st, progress, max_requests)
            if streamed == payload.sha256:
                await _rename(sftp, spart, sdest)
                st.verified = "stream"
                return st
        # not what was sent (e.g. a write landed behind the hasher): hash the whole file again
        done = await _script(conn, target, settings, python, FINISH, part, dest, payload.sha256)
        st.verified = "rehash"
    except _LOST as exc:
        raise _dropped(exc, target, f"the upload of {dest}") from exc
    except asyncssh.SFTPError as exc:
        raise CommandFailed(
            f"cannot write {posixpath.dirname(dest) or dest} on {target.address}: {exc.reason}",
            device_id=target.device_id,
        ) from exc
    if not done.get("ok"):
        raise DigestMismatch(
            str(done.get("sha256")),
            f"{dest} on {target.address} does not match sha256 {payload.sha256} after the upload "
            f"(sha256 {done.get('sha256')}); the partial file was removed, a retry sends it again",
            device_id=target.device_id,
        )
    return st


__all__ = ["MAX_REQUESTS", "SEGMENT", "DigestMismatch", "Payload", "ShipStats", "ship"]
