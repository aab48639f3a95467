"""`evc up` as a user runs it: a real subprocess on a temporary data directory, with its
embedded Redis, API, worker, beat and simulated fleet. Private to its owner, refuses a taken
port, stops everything it started (simulated devices' detached programs too), brings the same
fleet back on a second start, and exits non-zero when a component dies."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import requests

pytestmark = pytest.mark.integration

EVC = [sys.executable, "-m", "evc.cli"]
MARK = "31337.25"  # `sleep <MARK>`: a detached program started on a simulated device


class Up:
    """One `evc up` subprocess; its output goes to a file read back as it grows."""

    def __init__(self, data_dir: Path, *args: str, own_group: bool = False) -> None:
        self.data_dir = data_dir
        self.out_path = data_dir.parent / f"up-{time.monotonic_ns()}.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVC_")}
        env.update(EVC_DATA_DIR=str(data_dir), EVC_HEALTH_INTERVAL_S="3600", COLUMNS="400")
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(  # own_group: a process group of its own, as in a terminal
                [*EVC, "up", *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=own_group
            )

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_up(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while "Press Ctrl-C" not in self.output:
            assert self.proc.poll() is None, f"evc up exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < deadline, f"evc up did not start in {timeout} s:\n{self.output}"
            time.sleep(0.3)

    def exit_code(self, timeout: float = 90.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"evc up did not stop in {timeout} s:\n{self.output}") from None

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.data_dir / "stack.json").read_text()))

    def api(self, method: str, path: str, **kw: Any) -> Any:
        token = (self.data_dir / "admin-token").read_text().strip()
        resp = requests.request(
            method, self.state["api_url"] + path, headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw
        )
        assert resp.ok, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def wait_job(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.api("GET", f"/api/v1/jobs/{job_id}")
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return dict(job)
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
            time.sleep(0.3)

    def devices(self, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        """The registered devices, once *n* of them have completed registration."""
        deadline = time.monotonic() + timeout
        while True:
            items = self.api("GET", "/api/v1/devices", params={"limit": 100})["items"]
            if len(items) == n and all(d["state"] not in ("pending",) for d in items):
                return sorted(items, key=lambda d: d["name"])
            assert time.monotonic() < deadline, f"devices not registered: {items}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.exit_code()


def cmdlines() -> dict[int, str]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def left_behind(data_dir: Path) -> list[str]:
    """Processes still running that belong to this stack: its data directory or our marker."""
    return [f"{pid}: {c}" for pid, c in cmdlines().items() if str(data_dir) in c or f"sleep {MARK}" in c]


def wait_gone(data_dir: Path, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := left_behind(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "evc"
    yield d
    for pid, c in cmdlines().items():  # never leave a stack behind, whatever failed
        if str(d) in c or f"sleep {MARK}" in c:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def as_nobody(code: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run Python *code* as the unprivileged account `nobody` (no supplementary groups)."""
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            sys.executable,
            "-I",
            "-c",
            code,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


def start_detached(dev: dict[str, Any], key: Path) -> None:
    """On a simulated device, start programs that leave their session, as exporters do."""

    async def go() -> None:
        async with asyncssh.connect(
            dev["host"], port=dev["port"], username=dev["username"], client_keys=[str(key)], known_hosts=None
        ) as conn:
            await conn.run(
                f"setsid sleep {MARK} </dev/null >/dev/null 2>&1 & "
                f"nohup sh -c 'sleep {MARK}' </dev/null >/dev/null 2>&1 &",
                check=True,
            )

    import asyncio

    asyncio.run(go())


def check_private(up: Up) -> bool:
    """Point 1: the data directory and its files are the owner's; Redis wants the password.
    False when the checks as another account could not run (they need root, for setpriv)."""
    d = up.data_dir
    assert d.stat().st_mode & 0o777 == 0o700
    homes = d / "sim" / "homes"
    loose = [
        f"{oct(p.stat().st_mode & 0o777)} {p}"
        for p in d.rglob("*")
        if homes not in p.parents and not p.is_symlink() and p.stat().st_mode & 0o077
    ]
    assert not loose, loose
    password = (d / "redis" / "password").read_text().strip()
    assert len(password) >= 32 and (d / "redis" / "password").stat().st_mode & 0o777 == 0o600
    assert password not in up.output
    port = up.state["redis_port"]
    if os.geteuid() != 0:
        return False  # the checks as another account need root (setpriv); the modes above still hold
    probe = as_nobody(
        f"""
import os, socket, pathlib, sys
password = sys.stdin.read().encode()  # not in this probe's own command line
d = {str(d)!r}
for what in (lambda: os.listdir(d), lambda: open(d + "/admin-token").read(),
             lambda: open(d + "/redis/password").read()):
    try:
        what()
        print("READ")
    except PermissionError:
        print("denied")
s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
s.sendall(b"PING\\r\\nSET evc:x y\\r\\nKEYS *\\r\\n")
import time; time.sleep(0.5)
print(s.recv(4096).decode())
hits = [p.name for p in pathlib.Path("/proc").iterdir() if p.name.isdigit()
        and password in (lambda f: f.read_bytes() if f.exists() else b"")(p / "cmdline")]
print("cmdline hits", hits)
""",
        stdin=password,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[:3] == ["denied", "denied", "denied"], probe.stdout
    assert "NOAUTH" in probe.stdout and "+PONG" not in probe.stdout and "+OK" not in probe.stdout
    assert "cmdline hits []" in probe.stdout
    return True


def test_up_is_private_stops_everything_restarts_the_fleet_and_dies_loudly(data_dir: Path) -> None:
    up = Up(data_dir, "--sim", "2", "--bind", "127.0.0.1:0")
    try:
        up.wait_up()
        first = up.devices(2)
        assert all(d["state"] != "failed" for d in first), first
        as_nobody_ran = check_private(up)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVC_")}
        listed = subprocess.run(  # the CLI finds the running stack from the data directory alone
            [*EVC, "--json", "device", "list"],
            env={**env, "EVC_DATA_DIR": str(data_dir)},
            capture_output=True,
            text=True,
        )
        assert listed.returncode == 0 and json.loads(listed.stdout)["total"] == 2, listed.stderr
        second = Up(data_dir, "--bind", "127.0.0.1:0")  # one stack per data directory
        assert second.exit_code(60) != 0
        assert f"another `evc up` (pid {up.proc.pid}) runs on" in re.sub(r"\s+", " ", second.output), second.output
        assert up.state["pid"] == up.proc.pid  # and left the running stack's state alone
        start_detached(first[0], data_dir / "ssh" / "id_ed25519")
        deadline = time.monotonic() + 10
        while sum(f"sleep {MARK}" in c for c in cmdlines().values()) < 2:
            assert time.monotonic() < deadline, "the detached programs did not start"
            time.sleep(0.1)
        # issue 11 point 4: SIGTERM stops everything it started, on the devices too
        up.proc.send_signal(signal.SIGTERM)
        assert up.exit_code() == 0, up.output
        assert "stopped." in up.output
        assert wait_gone(data_dir) == []
    finally:
        up.stop()

    # the same data directory brings the same fleet back, working; a device whose port was
    # taken meanwhile is registered again where it is now
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port's old connections linger
    squatter.bind(("127.0.0.1", first[0]["port"]))
    squatter.listen()
    up = Up(data_dir, "--sim", "2", "--bind", "127.0.0.1:0")
    try:
        up.wait_up()
        squatter.close()
        again = up.devices(2)
        same = [(d["id"], d["name"], d["port"]) for d in first[1:]]
        assert [(d["id"], d["name"], d["port"]) for d in again[1:]] == same
        moved = again[0]
        assert moved["name"] == first[0]["name"] and moved["port"] != first[0]["port"], moved
        assert moved["state"] != "failed", moved
        for d in again:
            job = up.api("POST", f"/api/v1/devices/{d['id']}/facts")
            assert up.wait_job(job["id"])["state"] == "succeeded", job
        # a component that dies stops the stack with a message naming it and its log
        os.kill(up.state["components"]["worker"], signal.SIGKILL)
        code = up.exit_code(60)
        assert code != 0, up.output
        out = re.sub(r"\s+", " ", up.output)
        assert "worker was killed by SIGKILL" in out and str(data_dir / "logs" / "worker.log") in out, out
        assert wait_gone(data_dir) == []
    finally:
        squatter.close()
        up.stop()
    if not as_nobody_ran:  # said, not passed over: everything above ran and passed
        pytest.skip("the checks as the account `nobody` (no reading the data dir, NOAUTH) need root; the rest passed")


def test_up_refuses_a_taken_api_port(data_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        up = Up(data_dir, "--bind", f"127.0.0.1:{port}")
        code = up.exit_code(60)
    out = re.sub(r"\s+", " ", up.output)
    assert code != 0
    assert f"the API address 127.0.0.1:{port} is in use" in out and "--bind" in out, out
    assert "admin token" not in out and "evco_" not in out
    assert not (data_dir / "redis").exists()  # nothing was started
    assert wait_gone(data_dir) == []


def test_simulated_devices_keep_their_ports_across_restarts(tmp_path: Path) -> None:
    """What a second `evc up` relies on: the simulator serves each device on the port saved for
    it, and a device whose saved port is taken now gets another one instead of failing."""
    import asyncio

    from evc.embedded import free_port
    from evc_sim import Simulator

    async def go(saved: dict[str, int]) -> dict[str, int]:
        sim = Simulator(tmp_path / "sim")
        try:
            return {d.name: d.port for d in await sim.start(2, "keep", ports=saved)}
        finally:
            await sim.stop()

    first = asyncio.run(go({}))
    assert asyncio.run(go(first)) == first
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        kept = free_port()
        again = asyncio.run(go({"keep-0001": kept, "keep-0002": taken}))
    assert again["keep-0001"] == kept and again["keep-0002"] not in (taken, 0)


def listeners(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} shows them) listening on TCP *port*."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                out.append(addr)
    return out


def test_redis_is_loopback_only_and_ctrl_c_stops_everything(data_dir: Path) -> None:
    """Issue 10.1: the embedded Redis listens on 127.0.0.1 only, protected mode on. Issue 11.4:
    Ctrl-C (SIGINT) stops everything `evc up` started, a device's detached programs too."""
    import redis

    from tests.fixtures.helpers import own_address

    up = Up(data_dir, "--sim", "1", "--bind", "127.0.0.1:0", own_group=True)
    try:
        up.wait_up()
        (dev,) = up.devices(1)
        port = up.state["redis_port"]
        password = (data_dir / "redis" / "password").read_text().strip()
        with redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5) as r:
            assert r.config_get("bind") == {"bind": "127.0.0.1"}
            assert r.config_get("protected-mode") == {"protected-mode": "yes"}
        assert listeners(port) == ["0100007F"], listeners(port)  # 127.0.0.1, and no IPv6 socket
        outside = own_address()
        if outside is not None:  # the machine's own non-loopback address reaches nothing
            with pytest.raises(ConnectionRefusedError), socket.create_connection((outside, port), timeout=5):
                pass
        start_detached(dev, data_dir / "ssh" / "id_ed25519")
        deadline = time.monotonic() + 10
        while sum(f"sleep {MARK}" in c for c in cmdlines().values()) < 2:
            assert time.monotonic() < deadline, "the detached programs did not start"
            time.sleep(0.1)
        os.killpg(up.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
        assert up.exit_code() == 0, up.output
        assert "stopped." in up.output
        assert wait_gone(data_dir) == []
    finally:
        up.stop()
