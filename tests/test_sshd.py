"""A real OpenSSH sshd on loopback: the reference the simulator is measured against."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import asyncssh
import pytest

from evc_sim.sshd import OpenSSHServer, SSHDUnavailable, sshd_binary
from tests.fixtures.sim import connect, run_ansible

pytestmark = pytest.mark.integration


def test_sshd_runs_commands_with_stdin_eof_and_exit_status(sshd: OpenSSHServer, evc_key_path: Path) -> None:
    async def go() -> tuple[asyncssh.SSHCompletedProcess, asyncssh.SSHCompletedProcess]:
        async with await connect(sshd, evc_key_path) as conn:  # host key checked
            who = await conn.run("id -un", check=True)
            cat = await conn.run("cat; exit 7", input="through sshd\n")
            return who, cat

    who, cat = asyncio.run(go())
    assert str(who.stdout).strip() == sshd.username
    assert (cat.stdout, cat.exit_status) == ("through sshd\n", 7)


def test_sshd_sftp(sshd: OpenSSHServer, evc_key_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "via-sftp.txt"

    async def go() -> None:
        async with await connect(sshd, evc_key_path) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open(str(target), "w") as f:
                await f.write("sftp ok\n")

    asyncio.run(go())
    assert target.read_text() == "sftp ok\n"


def test_sshd_refuses_a_key_until_authorized(sshd: OpenSSHServer, evc_key_path: Path, tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "other"
    key_path.write_bytes(key.export_private_key())
    key_path.chmod(0o600)

    async def whoami() -> str:
        async with await connect(sshd, key_path) as conn:
            return str((await conn.run("whoami", check=True)).stdout).strip()

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(whoami())
    sshd.authorize(key.export_public_key().decode())
    assert asyncio.run(whoami()) == sshd.username


def test_ansible_ping_against_real_sshd(sshd: OpenSSHServer, evc_key_path: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    # This host's login shell may put a python shim first on PATH (pyenv does) that interpreter
    # discovery would pick up; name the system interpreter, as an operator would.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    res = run_ansible(
        ["ansible", "devices", "-m", "ping", "--tree", str(tree)],
        [("real-sshd", sshd)], evc_key_path, tmp_path,
        host_vars=f"ansible_python_interpreter={python}",
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tree / "real-sshd").read_text())["ping"] == "pong"


def test_context_manager_stops_sshd(tmp_path: Path) -> None:
    try:
        sshd_binary()
    except SSHDUnavailable as exc:
        pytest.skip(str(exc))
    with OpenSSHServer(tmp_path / "own") as server:
        port, proc = server.port, server.proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None
    with pytest.raises(OSError):
        asyncio.run(asyncio.wait_for(asyncio.open_connection(server.host, port), 2))
