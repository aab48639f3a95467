"""The device simulator against real clients: asyncssh, OpenSSH's scp, and unmodified Ansible."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest

from evc.errors import ConfigError, NotFound
from evc_sim import SimDevice, SimulatorThread, read_state, write_state
from evc_sim.accounts import Account, Accounts, available_privileges, running_as_root
from evc_sim.server import edit_authorized_keys
from evc_sim.spawn import REQUEST_MAX, Spawner, helpers_supported, launch_options, setpriv_prefix
from tests.fixtures.sim import MakeDevices, connect, run_ansible

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: the privilege test of EVC's registration probe (evc/registration.py)
PROBE = (
    'if [ "$(id -u)" = 0 ]; then echo root; '
    "elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo sudo; "
    "else echo user; fi"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _exec(dev: SimDevice, key: Path, command: str, **kw: Any) -> asyncssh.SSHCompletedProcess:
    async with await connect(dev, key) as conn:
        return await conn.run(command, **{"check": False, **kw})


# -- commands ------------------------------------------------------------------------------------


def test_exec_forwards_stdin_eof_output_and_exit_status(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    blob = os.urandom(1 << 20)  # binary, and big enough to exercise flow control both ways

    async def go() -> tuple[asyncssh.SSHCompletedProcess, asyncssh.SSHCompletedProcess]:
        async with await connect(dev, evc_key_path) as conn:
            echo = await conn.run("cat; echo to-stderr >&2; exit 3", input=blob, encoding=None)
            count = await conn.run("wc -c", input="x" * 1000)
            return echo, count

    echo, count = run(go())
    assert echo.exit_status == 3  # cat returned only because EOF was forwarded
    assert echo.stdout == blob
    assert echo.stderr == b"to-stderr\n"
    assert str(count.stdout).strip() == "1000"


def test_session_environment_home_and_env_requests(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    res = run(
        _exec(
            dev, evc_key_path, 'printf "%s|%s|%s|%s|%s" "$HOME" "$(pwd)" "$USER" "$FOO" "$SSH_CONNECTION"',
            env={"FOO": "bar baz", "HOME": "/not-this"},
        )
    )  # fmt: skip
    home, cwd, user, foo, ssh_conn = str(res.stdout).split("|")
    assert home == cwd == str(dev.home)
    assert user == dev.username
    assert foo == "bar baz"
    assert ssh_conn.split()[2:] == [dev.host, str(dev.port)]


def test_pty_session(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    res = run(_exec(dev, evc_key_path, "tty; stty size; echo $TERM", term_type="xterm", term_size=(120, 40)))
    lines = str(res.stdout).splitlines()
    assert res.exit_status == 0
    assert lines[0].startswith("/dev/pts/")
    assert lines[1:] == ["40 120", "xterm"]


def test_pty_is_the_controlling_terminal_and_belongs_to_the_account(
    sim_devices: MakeDevices, evc_key_path: Path
) -> None:
    for dev in sim_devices(3, privilege=list(available_privileges())):
        # (/dev/tty opens only for a process that has a controlling terminal)
        res = run(_exec(dev, evc_key_path, 'tty; stat -c %U "$(tty)"; : < /dev/tty && echo ctty', term_type="xterm"))
        tty, owner, ctty = str(res.stdout).split()
        assert res.exit_status == 0, dev.privilege
        assert tty.startswith("/dev/pts/")
        assert (owner, ctty) == (dev.username, "ctty"), dev.privilege


def test_interactive_shell_over_pty(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]

    async def go() -> asyncssh.SSHCompletedProcess:
        async with await connect(dev, evc_key_path) as conn:
            proc = await conn.create_process(term_type="dumb")
            proc.stdin.write("echo shell-$((6*7))\nexit 5\n")
            return await asyncio.wait_for(proc.wait(), 20)

    res = run(go())
    assert "shell-42" in str(res.stdout)
    assert res.exit_status == 5


def test_signal_ends_command_and_is_reported(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    res = run(_exec(dev, evc_key_path, "kill -TERM $$"))
    assert res.exit_status == -1
    assert res.exit_signal is not None and res.exit_signal[0] == "TERM"


def test_device_serves_as_a_jump_host(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    jump, target = sim_devices(2)

    async def go() -> str:
        async with await connect(jump, evc_key_path) as tunnel:
            async with await connect(target, evc_key_path, tunnel=tunnel) as conn:
                return str((await conn.run("echo via-jump", check=True)).stdout)

    assert run(go()) == "via-jump\n"


def test_output_pauses_while_the_client_window_is_full(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]

    async def go() -> asyncssh.SSHCompletedProcess:
        async with await connect(dev, evc_key_path) as conn:
            # a window far smaller than the output: the session must stop reading and resume
            cmd = "head -c 3000000 /dev/zero; echo end >&2; head -c 1000000 /dev/zero >&2"
            return await conn.run(cmd, encoding=None, window=16384, max_pktsize=8192)

    res = run(go())
    assert res.exit_status == 0
    assert res.stdout == bytes(3_000_000)
    assert res.stderr == b"end\n" + bytes(1_000_000)


def test_commands_start_like_sshd_starts_them(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    """Every level: nothing ignored or blocked, own session, no descriptor leaked, and no thread
    waiting for each command (the simulator watches its commands through pidfds)."""
    devices = sim_devices(3, privilege=list(available_privileges()))
    probe = (
        "grep -E '^(SigIgn|SigBlk)' /proc/self/status; ls /proc/self/fd | wc -l; "
        "set -- $(cut -d')' -f2- /proc/$$/stat); [ $3 = $$ ] && [ $4 = $$ ] && echo leader; (yes | head -1)"
    )

    async def go(dev: SimDevice) -> tuple[list[str], list[str]]:
        async with await connect(dev, evc_key_path) as conn:
            sleepers = [await conn.create_process("sleep 1") for _ in range(3)]
            await asyncio.sleep(0.3)
            waiting = [
                t.name for t in threading.enumerate() if t.name.startswith(("asyncio-waitpid-", "evc-sim-wait-"))
            ]
            res = await conn.run(probe, check=True)
            for p in sleepers:
                await p.wait()
            return str(res.stdout).split(), waiting

    for dev in devices:
        out, waiting = run(go(dev))
        assert out == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16, "4", "leader", "y"], dev.privilege
        assert waiting == [], dev.privilege


def test_a_command_that_cannot_start_fails_alone(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]

    async def go() -> tuple[int | None, str]:
        async with await connect(dev, evc_key_path) as conn:
            bad = await conn.run("echo hi", env={"X": "a\x00b"})  # no NUL byte in an environment
            return bad.exit_status, str((await conn.run("echo after", check=True)).stdout)

    assert run(go()) == (255, "after\n")


# -- files ---------------------------------------------------------------------------------------


def test_sftp_put_get_in_home_as_the_account(sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path) -> None:
    dev = sim_devices(1, privilege="sudo")[0]
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))

    async def go() -> tuple[str, list[str], str]:
        async with await connect(dev, evc_key_path) as conn, conn.start_sftp_client() as sftp:
            await sftp.mkdir("up")
            await sftp.put(str(src), "up/data.bin")
            await sftp.get("up/data.bin", str(tmp_path / "back.bin"))
            owner = await conn.run("stat -c %U up/data.bin", check=True)
            return await sftp.realpath("."), sorted(await sftp.listdir("up")), str(owner.stdout)

    cwd, names, owner = run(go())
    assert cwd == str(dev.home)
    assert names == [".", "..", "data.bin"]
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert (dev.home / "up" / "data.bin").read_bytes() == src.read_bytes()
    assert owner.strip() == dev.username


def test_scp_both_protocols(sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path) -> None:
    dev = sim_devices(1)[0]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{dev.host}]:{dev.port} {dev.host_key_public}\n")
    src = tmp_path / "f.txt"
    src.write_text("over scp\n")
    base = ["scp", "-q", "-i", str(evc_key_path), "-P", str(dev.port),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes"]  # fmt: skip
    for flag, name in (([], "sftp.txt"), (["-O"], "legacy.txt")):  # SFTP, then `scp -t` exec
        subprocess.run([*base, *flag, str(src), f"{dev.username}@{dev.host}:{name}"],
                       check=True, timeout=30, capture_output=True)  # fmt: skip
        assert (dev.home / name).read_text() == "over scp\n"
    back = tmp_path / "back.txt"
    subprocess.run([*base, f"{dev.username}@{dev.host}:legacy.txt", str(back)],
                   check=True, timeout=30, capture_output=True)  # fmt: skip
    assert back.read_text() == "over scp\n"


# -- privilege levels ----------------------------------------------------------------------------


@pytest.mark.parametrize("privilege", ["root", "sudo", "user"])
def test_privilege_level_is_what_a_probe_detects(privilege: str, sim_devices: MakeDevices, evc_key_path: Path) -> None:
    if privilege not in available_privileges():
        pytest.skip("a simulated root device needs the tests to run as root")
    dev = sim_devices(1, privilege=privilege)[0]
    assert dev.privilege == privilege
    res = run(_exec(dev, evc_key_path, f"id -u; id -un; {PROBE}"))
    uid, name, detected = str(res.stdout).split()
    assert detected == privilege
    assert name == dev.username
    if privilege == "root":
        assert uid == "0"
    elif running_as_root():  # real, separate Unix accounts
        assert uid != "0"
        assert dev.username == f"evcsim-{privilege}"


# -- starting commands (evc_sim.spawn) -----------------------------------------------------------

needs_accounts = pytest.mark.skipif(not running_as_root(), reason="another account's commands need root")


@pytest.fixture()
def account_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="evc-spawn-"))
    d.chmod(0o755)  # the account works in it
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _spawned(
    spawner: Spawner, argv: Sequence[str], account: Account, cwd: Path, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run *argv* through *spawner* on a fresh loop; (return code, stdout + stderr)."""

    async def go() -> tuple[int, str]:
        r, w = os.pipe()
        try:
            with open(os.devnull, "rb") as null:
                child = await spawner.spawn(
                    argv, account, cwd=str(cwd), env=env or {"PATH": "/usr/bin:/bin"},
                    stdin=null.fileno(), stdout=w, stderr=w,
                )  # fmt: skip
        finally:
            os.close(w)
        with os.fdopen(r, "rb") as out:
            text = await asyncio.get_running_loop().run_in_executor(None, out.read)
        return await child.wait(), text.decode()

    async def with_close() -> tuple[int, str]:
        try:
            return await go()
        finally:
            await spawner.close()

    return run(with_close())


WHO = 'printf "%s|%s|%s|%s|%s" "$(id -u):$(id -g):$(id -G)" "$(pwd)" "$FOO" "$(grep SigIgn /proc/self/status)" "$$"'


@needs_accounts
@pytest.mark.parametrize("helpers", [True, False], ids=["spawner-process", "setpriv"])
def test_another_accounts_command_runs_as_that_account(helpers: bool, sim_root: Path, account_dir: Path) -> None:
    account = Accounts(sim_root).for_privilege("user")
    spawner = Spawner(helpers=helpers)
    if helpers and not spawner.use_helpers:
        pytest.skip("spawner processes cannot run here")
    rc, out = _spawned(spawner, ["/bin/sh", "-c", WHO + "; exit 3"], account, account_dir, {"FOO": "b a r"})
    ids, cwd, foo, sig_ign, _ = out.split("|")
    assert rc == 3
    uid, gid, groups = ids.split(":")
    assert (int(uid), int(gid)) == (account.uid, account.gid)
    assert sorted(int(g) for g in groups.split()) == sorted(set(account.groups))
    assert (cwd, foo) == (str(account_dir), "b a r")
    assert sig_ign.split() == ["SigIgn:", "0" * 16]


@needs_accounts
def test_setpriv_and_no_fork_for_another_account(sim_root: Path) -> None:
    account = Accounts(sim_root).for_privilege("sudo")
    prefix, kw = launch_options(account)
    if setpriv_prefix(account) is None:
        assert kw == {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}
        pytest.skip("setpriv is not installed: the fork path it is")
    assert kw == {}  # no user=/group=/extra_groups=: CPython may vfork
    assert prefix[0].endswith("setpriv") and f"--reuid={account.uid}" in prefix
    assert Spawner().use_helpers == helpers_supported()
    assert Spawner(helpers=False).use_helpers is False


@needs_accounts
def test_spawner_reports_errors_and_falls_back_for_big_requests(sim_root: Path, account_dir: Path) -> None:
    account = Accounts(sim_root).for_privilege("user")
    missing = account_dir / "gone"
    with pytest.raises(FileNotFoundError) as err:
        _spawned(Spawner(), ["/bin/sh", "-c", "true"], account, missing)
    assert err.value.filename == str(missing)
    # too big for one message (no single string may exceed 128 KiB): started the setpriv way
    env = {f"BIG{i}": "x" * 50_000 for i in range(REQUEST_MAX // 50_000 + 1)}
    rc, out = _spawned(Spawner(), ["/bin/sh", "-c", 'echo "${#BIG0} $(id -u)"'], account, account_dir, env)
    assert (rc, out) == (0, f"50000 {account.uid}\n")


@needs_accounts
def test_spawner_process_death_ends_its_commands_and_a_new_one_takes_over(sim_root: Path, account_dir: Path) -> None:
    account = Accounts(sim_root).for_privilege("user")
    spawner = Spawner(helpers=True)
    if not spawner.use_helpers:
        pytest.skip("spawner processes cannot run here")
    null = os.open(os.devnull, os.O_RDWR)

    async def go() -> tuple[int, bool, int, int]:
        kw: dict[str, Any] = {"cwd": str(account_dir), "env": {}, "stdin": null, "stdout": null, "stderr": null}
        first = await spawner.spawn(["/bin/sh", "-c", "sleep 30"], account, **kw)
        helper_pid = next(iter(spawner._helpers.values())).process.pid
        os.kill(helper_pid, signal.SIGKILL)
        rc = await asyncio.wait_for(first.wait(), 10)  # ended: its spawner cannot report it any more
        await asyncio.sleep(0.2)
        try:  # (a zombie is gone: its parent, the spawner, died and init has not reaped it yet)
            still_there = Path(f"/proc/{first.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            still_there = False
        second = await spawner.spawn(["/bin/sh", "-c", "exit 4"], account, **kw)
        new_pid = next(iter(spawner._helpers.values())).process.pid
        try:
            return rc, still_there, await asyncio.wait_for(second.wait(), 10), new_pid - helper_pid
        finally:
            await spawner.close()

    try:
        rc, still_there, rc2, new_helper = run(go())
    finally:
        os.close(null)
    assert rc == -signal.SIGKILL
    assert not still_there  # killed, not left running unwatched
    assert rc2 == 4
    assert new_helper != 0


@needs_accounts
def test_spawner_queues_what_its_socket_cannot_take_and_kills_what_nobody_waits_for(
    sim_root: Path, account_dir: Path
) -> None:
    account = Accounts(sim_root).for_privilege("user")
    spawner = Spawner(helpers=True)
    if not spawner.use_helpers:
        pytest.skip("spawner processes cannot run here")
    null = os.open(os.devnull, os.O_RDWR)

    async def go() -> tuple[list[int], list[int]]:
        kw: dict[str, Any] = {"cwd": str(account_dir), "stdin": null, "stdout": null, "stderr": null}
        env = {"PAD": "x" * 20_000}  # 300 of these are far more than a socket buffer holds
        children = await asyncio.gather(
            *(spawner.spawn(["/bin/sh", "-c", f"exit {i % 7}"], account, env=env, **kw) for i in range(300))
        )
        codes = [await c.wait() for c in children]
        # a session that goes away while its command is being started: the command is killed
        sleeper = ["/bin/sh", "-c", "exec sleep 31.4159"]
        task = asyncio.ensure_future(spawner.spawn(sleeper, account, env={"PATH": "/usr/bin:/bin"}, **kw))
        await asyncio.sleep(0)  # the request is sent
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(1.0)
        left = _live_processes(b"sleep\x0031.4159\x00")
        await spawner.close()
        return codes, left

    try:
        codes, left = run(go())
    finally:
        os.close(null)
    assert codes == [i % 7 for i in range(300)]
    assert left == []


def _live_processes(cmdline: bytes) -> list[int]:
    """Pids of the processes (zombies aside) whose command line is *cmdline*."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except OSError:
            continue
    return found


# -- faults --------------------------------------------------------------------------------------


def test_fault_down_refuses_and_ok_restores_same_port_and_host_key(
    simulator: SimulatorThread, sim_devices: MakeDevices, evc_key_path: Path
) -> None:
    dev = sim_devices(1)[0]
    port, host_key = dev.port, dev.host_key_public

    async def cut_while_connected() -> None:
        async with await connect(dev, evc_key_path) as conn:
            proc = await conn.create_process("sleep 30")
            await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, simulator.set_fault, dev.name, "down")
            await asyncio.wait_for(proc.wait(), 10)  # returns (no exit status) once cut

    run(cut_while_connected())
    assert dev.mode == "down"
    with pytest.raises(ConnectionRefusedError):
        run(_exec(dev, evc_key_path, "true"))
    simulator.set_fault(dev.name, "ok")
    assert (dev.port, dev.host_key_public) == (port, host_key)
    res = run(_exec(dev, evc_key_path, "echo back"))  # host key checked by connect()
    assert res.stdout == "back\n"


def test_fault_refuse_auth(simulator: SimulatorThread, sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    simulator.set_fault(dev.name, "refuse_auth")
    with pytest.raises(asyncssh.PermissionDenied):
        run(_exec(dev, evc_key_path, "true"))
    simulator.set_fault(dev.name, "ok")
    assert run(_exec(dev, evc_key_path, "true")).exit_status == 0


def test_fault_slow_delays_each_command(
    simulator: SimulatorThread, sim_devices: MakeDevices, evc_key_path: Path
) -> None:
    dev = sim_devices(1)[0]
    simulator.set_fault(dev.name, "slow", slow_s=0.6)

    async def timed() -> list[float]:
        async with await connect(dev, evc_key_path) as conn:
            out = []
            for _ in range(2):
                t0 = time.monotonic()
                await conn.run("true", check=True)
                out.append(time.monotonic() - t0)
            return out

    assert all(t >= 0.6 for t in run(timed()))
    simulator.set_fault(dev.name, "ok")
    assert run(_exec(dev, evc_key_path, "echo fast")).stdout == "fast\n"


def test_fault_drop_cuts_the_connection_mid_command(
    simulator: SimulatorThread, sim_devices: MakeDevices, evc_key_path: Path
) -> None:
    dev = sim_devices(1)[0]
    simulator.set_fault(dev.name, "drop", drop_after_s=0.3)
    marker = dev.home / "started"

    async def go(command: str) -> tuple[float, str, BaseException | None]:
        t0 = time.monotonic()
        try:
            async with await connect(dev, evc_key_path) as conn:
                res = await asyncio.wait_for(conn.run(command), 10)
                assert res.exit_status is None and res.exit_signal is None, res
                return time.monotonic() - t0, str(res.stdout), None
        except (asyncssh.Error, OSError) as exc:
            return time.monotonic() - t0, "", exc

    elapsed, _, _ = run(go(f"touch {marker}; echo started; sleep 20"))
    assert marker.exists()  # the command did start
    assert elapsed < 8  # and the connection went before it could end
    _, _, _ = run(go("true"))  # even a quick command never reports an exit status
    simulator.set_fault(dev.name, "ok")
    assert run(_exec(dev, evc_key_path, "true")).exit_status == 0


# -- keys ----------------------------------------------------------------------------------------


def test_authorized_keys_edits_take_effect(
    simulator: SimulatorThread, sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path
) -> None:
    dev, other = sim_devices(2)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="operator")
    key_path = tmp_path / "op_key"
    key_path.write_bytes(key.export_private_key())
    line = key.export_public_key().decode().strip()
    with pytest.raises(asyncssh.PermissionDenied):
        run(_exec(dev, key_path, "true"))
    simulator.authorize(line, dev.name)
    assert str(run(_exec(dev, key_path, "whoami")).stdout).strip() == dev.username
    with pytest.raises(asyncssh.PermissionDenied):  # only that device
        run(_exec(other, key_path, "true"))
    simulator.deauthorize(line)
    with pytest.raises(asyncssh.PermissionDenied):
        run(_exec(dev, key_path, "true"))
    # the device's owner installs the key from a shell on the device, as EVC tells them to
    run(_exec(dev, evc_key_path, f"echo '{line}' >> ~/.ssh/authorized_keys", check=True))
    assert run(_exec(dev, key_path, "true")).exit_status == 0


def test_wrong_username_is_refused(sim_devices: MakeDevices, evc_key_path: Path) -> None:
    dev = sim_devices(1)[0]
    with pytest.raises(asyncssh.PermissionDenied):
        run(connect(dev, evc_key_path, username="nobody-here"))


# -- Ansible ---------------------------------------------------------------------------------------


def test_ansible_ping_three_devices(sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path) -> None:
    devices = sim_devices(3, privilege=list(available_privileges()))
    tree = tmp_path / "tree"
    res = run_ansible(
        ["ansible", "devices", "-m", "ping", "--tree", str(tree)],
        [(d.name, d) for d in devices], evc_key_path, tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for d in devices:
        assert json.loads((tree / d.name).read_text())["ping"] == "pong"


def test_ansible_playbook_copies_files_and_becomes_root_through_sudo(
    sim_devices: MakeDevices, evc_key_path: Path, tmp_path: Path
) -> None:
    dev = sim_devices(1, privilege="sudo")[0]
    playbook = tmp_path / "play.yml"
    # (~ in a task would be the shared account's home: see evc_sim.accounts)
    playbook.write_text(
        "- hosts: devices\n"
        "  gather_facts: false\n"
        "  tasks:\n"
        "    - ansible.builtin.copy: {content: \"from ansible\\n\", dest: \"{{ home }}/copied.txt\", mode: \"0640\"}\n"
        "    - ansible.builtin.command: id -un\n"
        "      become: true\n"
        "      register: who\n"
        "    - ansible.builtin.copy: {content: \"{{ who.stdout }}\\n\", dest: \"{{ home }}/who.txt\"}\n"
    )  # fmt: skip
    res = run_ansible(
        ["ansible-playbook", str(playbook), "-e", f"home={dev.home}"],
        [(dev.name, dev)], evc_key_path, tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert (dev.home / "copied.txt").read_text() == "from ansible\n"
    assert (dev.home / "copied.txt").stat().st_mode & 0o777 == 0o640
    who = (dev.home / "who.txt").read_text().strip()
    # real sudo makes it root; the stand-in used where sudo is not installed cannot
    assert who in {"root", dev.username}


# -- as a process --------------------------------------------------------------------------------


def _start_process(
    root: Path, state: Path, n: int, keys: Path, privileges: str, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    log = root / "sim.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evc_sim", "--devices", str(n), "--root", str(root / "sim"),
             "--state-file", str(state), "--authorized-keys", str(keys), "--privileges", privileges],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not state.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"simulator did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


@pytest.fixture()
def process_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="evc-simproc-"))
    root.chmod(0o711)  # see the sim_root fixture
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_simulator_process_writes_state_and_stops_on_sigterm(process_root: Path, evc_key_path: Path) -> None:
    state = process_root / "devices.json"
    proc = _start_process(process_root, state, 2, evc_key_path.with_suffix(".pub"), "sudo,user")
    try:
        devices = read_state(state)
        assert [d.privilege for d in devices] == ["sudo", "user"]
        raw = json.loads(state.read_text())["devices"][0]
        assert {"name", "host", "port", "username", "host_key", "privilege"} <= set(raw)
        for d in devices:
            assert run(_exec(d, evc_key_path, "echo hi")).stdout == "hi\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0
    assert not state.exists()


def _like_nohup_in_the_background() -> None:  # runs in the child between fork and exec
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})


def test_commands_start_with_default_signals_under_nohup(process_root: Path, evc_key_path: Path) -> None:
    """A simulator started with SIGHUP/SIGINT/SIGQUIT ignored and signals blocked (``nohup cmd &``)
    still starts its commands with nothing ignored and nothing blocked, as sshd does."""
    state = process_root / "devices.json"
    privileges = ",".join(available_privileges())
    proc = _start_process(
        process_root, state, len(available_privileges()), evc_key_path.with_suffix(".pub"), privileges,
        preexec_fn=_like_nohup_in_the_background,
    )  # fmt: skip
    try:
        for dev in read_state(state):
            out = run(_exec(dev, evc_key_path, "grep -E '^(SigIgn|SigBlk)' /proc/self/status")).stdout
            assert str(out).split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16], dev.privilege
    finally:
        proc.kill()  # (SIGTERM is blocked in it)
        proc.wait(20)


@pytest.mark.slow
def test_scale_one_process_serves_300_devices(process_root: Path, evc_key_path: Path) -> None:
    state = process_root / "devices.json"
    t0 = time.monotonic()
    proc = _start_process(process_root, state, 300, evc_key_path.with_suffix(".pub"), "user")
    started = time.monotonic() - t0
    try:
        devices = read_state(state)
        assert len({d.port for d in devices}) == 300
        assert len({d.host_key_public for d in devices}) == 300

        async def all_of_them() -> list[int | None]:
            gate = asyncio.Semaphore(50)

            async def one(d: SimDevice) -> int | None:
                async with gate:
                    res = await _exec(d, evc_key_path, "true")
                    return res.exit_status

            return await asyncio.gather(*(one(d) for d in devices))

        t1 = time.monotonic()
        statuses = run(all_of_them())
        ran = time.monotonic() - t1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert statuses == [0] * 300
    print(f"300 devices: started in {started:.1f} s, connect+`true` on all in {ran:.1f} s")


# -- pure parts ------------------------------------------------------------------------------------


def test_state_file_round_trip(tmp_path: Path) -> None:
    dev = SimDevice("d1", "127.0.0.1", 2222, "evcsim-user", "ssh-ed25519 AAAAC3Nz", tmp_path, "sudo")
    write_state(tmp_path / "s.json", [dev], pid=1)
    assert read_state(tmp_path / "s.json") == [dev]


def test_authorized_keys_edits_match_keys_not_lines(tmp_path: Path) -> None:
    ak = tmp_path / "authorized_keys"
    ak.write_text('from="127.0.0.1" ssh-ed25519 AAAAkeyA old-comment\nssh-rsa AAAAkeyB b\n')
    edit_authorized_keys(ak, add=["ssh-ed25519 AAAAkeyA new-comment", "ssh-ed25519 AAAAkeyC c"])
    assert ak.read_text().splitlines() == [
        'from="127.0.0.1" ssh-ed25519 AAAAkeyA old-comment', "ssh-rsa AAAAkeyB b",
        "ssh-ed25519 AAAAkeyC c",
    ]  # fmt: skip
    edit_authorized_keys(ak, remove=["ssh-ed25519 AAAAkeyA whatever"])
    assert "keyA" not in ak.read_text()
    with pytest.raises(ConfigError):
        edit_authorized_keys(ak, add=["not a key"])


def test_bad_names_modes_and_levels_are_refused(simulator: SimulatorThread, sim_devices: MakeDevices) -> None:
    dev = sim_devices(1)[0]
    with pytest.raises(ConfigError):
        simulator.set_fault(dev.name, "melting")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        simulator.add("../escape")
    with pytest.raises(ConfigError):
        simulator.start(1, privileges="admin")
    with pytest.raises(NotFound):
        simulator.set_fault("no-such-device", "down")
