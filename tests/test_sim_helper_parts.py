"""The pure parts of the simulator's session start and spawner process (no processes, no SSH).

What runs in the spawner process itself (namespaces, the serving loop) is covered for real by
test_sim.py and test_sim_namespaces.py.
"""

from __future__ import annotations

import array
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from evc_sim import session, spawn_helper
from evc_sim.namespaces import Isolation


def test_args_without_isolation() -> None:
    assert spawn_helper._parse_args(["5", "1000", "1001", "4,27,"]) == (5, 1000, 1001, [4, 27], None)
    assert spawn_helper._parse_args(["5", "0", "0", ""]) == (5, 0, 0, [], None)


def test_args_with_isolation() -> None:
    iso = Isolation(hostname="dev-1", uid_base=0x70000000, overlays=(), keep=("/srv/home",))
    fd, uid, gid, groups, spec = spawn_helper._parse_args(["7", "0", "0", "0", iso.to_arg()])
    assert (fd, uid, gid, groups, spec) == (7, 0, 0, [0], iso.to_arg())


def test_spec_reads_back_what_isolation_writes() -> None:
    iso = Isolation(
        hostname="edge-7",
        uid_base=0x70000000,
        overlays=(("/etc", "/s/upper/etc", "/s/work/etc"), ("/usr", "/s/upper/usr", "/s/work/usr")),
        keep=("/s/homes/edge-7",),
    )
    hostname, uid_base, overlays, keep = spawn_helper._parse_spec(iso.to_arg())
    assert hostname == "edge-7"
    assert uid_base == 0x70000000
    assert overlays == [["/etc", "/s/upper/etc", "/s/work/etc"], ["/usr", "/s/upper/usr", "/s/work/usr"]]
    assert keep == ["/s/homes/edge-7"]


def test_spec_without_user_namespace_or_overlays() -> None:
    iso = Isolation(hostname="h", uid_base=0, overlays=(), keep=("/home/h",))
    assert spawn_helper._parse_spec(iso.to_arg()) == ("h", 0, [], ["/home/h"])


def test_id_map_and_overlay_options() -> None:
    assert spawn_helper._id_map(0x70000000) == f"0 {0x70000000} 65536\n"
    assert (
        spawn_helper._overlay_options("/etc", "/s/upper/etc", "/s/work/etc")
        == "lowerdir=/etc,upperdir=/s/upper/etc,workdir=/s/work/etc"
    )


def test_received_fds_keeps_only_scm_rights_whole_ints() -> None:
    data = array.array("i", [3, 4, 5]).tobytes()
    anc = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, data + b"\0\0"),  # a trailing partial int is dropped
        (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [9]).tobytes()),
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [6]).tobytes()),
    ]
    assert spawn_helper._received_fds(anc) == [3, 4, 5, 6]
    assert spawn_helper._received_fds([]) == []


def test_received_fds_from_a_real_message() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())])
        _, anc, _, _ = b.recvmsg(16, socket.CMSG_SPACE(3 * spawn_helper._FD_BYTES), socket.MSG_CMSG_CLOEXEC)
        fds = spawn_helper._received_fds(anc)
        assert len(fds) == 2
        for fd in fds:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _process(command: str | None = None, term: str | None = None, subsystem: str | None = None) -> Any:
    return SimpleNamespace(command=command, term_type=term, subsystem=subsystem)


@pytest.mark.parametrize(
    ("command", "term", "expected"),
    [
        ("echo hi", None, (["/bin/sh", "-c", "echo hi"], None)),
        ("echo hi", "xterm", (["/bin/sh", "-c", "echo hi"], "xterm")),
        (None, "xterm", (["/bin/sh", "-i"], "xterm")),
        (None, None, (["/bin/sh"], None)),
    ],
)
def test_session_argv(command: str | None, term: str | None, expected: tuple[list[str], str | None]) -> None:
    assert session.session_argv(_process(command, term)) == expected


def test_sftp_session_has_no_terminal() -> None:
    argv, term = session.session_argv(_process(term="xterm", subsystem="sftp"))
    assert argv == [session.sftp_server() or "sftp-server"]
    assert term is None
