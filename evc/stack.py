"""`evc up`: run the whole stack on one machine — Redis (embedded unless configured), the API
under gunicorn, a worker, beat, optionally Flower and a simulated fleet — and stop it cleanly.

The stack is private to the account that runs it: the data directory is 0700 and what is in it
0600 (umask 077 for the stack and its children), the embedded Redis has a password kept there
and listens on loopback. Before the admin token is used or printed, the API answering on the
bind address must return the random instance id this run gave it. A component that dies stops
the stack with :class:`~evc.errors.ComponentDied`; stopping ends everything the stack started,
including what simulated devices left running (the stack adopts orphans: :mod:`evc.reaper`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from evc import flower, keys, metrics, reaper
from evc.auth import ensure_admin_token
from evc.embedded import RedisServer, free_port, private_password, write_private
from evc.errors import ComponentDied, ConfigError
from evc.settings import Settings, settings_env
from evc.store import Store

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"  # what a running `evc up` tells other commands (pids, ports), mode 0600
DEVICE_UMASK = 0o022  # simulated devices behave like sshd sessions, not like the private stack


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class Stack:
    """The processes of a local EVC, started in order and stopped in reverse.

    *adopt_orphans* (for `evc up`, whose process does nothing else) makes this process a child
    subreaper: detached descendants are reaped while it runs and ended when it stops."""

    settings: Settings
    api_workers: int = 2
    worker_concurrency: int = 4
    #: threads of the worker for the ``fl`` queue (one FL training task per device in a round)
    fl_worker_threads: int = 16
    flower_port: int | None = None
    sim_devices: int = 0
    log_dir: Path | None = None
    redis: RedisServer | None = None
    children: list[Child] = field(default_factory=list)
    admin_token: str = ""
    sim_state: Path | None = None
    adopt_orphans: bool = False
    instance_id: str = ""

    @property
    def local_url(self) -> str:
        """The API on its bind address (what this stack started), not the public URL."""
        return local_url(self.settings.api_bind)

    def start(self) -> Stack:
        os.umask(0o077)
        self._claim_data_dir()
        metrics_dir = self._configure()
        self._prepare_store()
        env = self._spawn_services(metrics_dir)
        self._wait_own_api()
        if self.sim_devices:
            sim_env = {k: v for k, v in env.items() if k != metrics.MULTIPROC_ENV}  # not a worker
            self._start_sim(sim_env)
        return self

    def _claim_data_dir(self) -> None:
        """Make the data directory private; refuse when another stack runs on it or the API's
        port is taken."""
        s = self.settings
        make_private(s.data_dir)
        self.log_dir = self.log_dir or s.data_dir / "logs"
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        other = running_stack(s.data_dir)
        if other:
            raise ConfigError(
                f"another `evc up` (pid {other}) runs on {s.data_dir}: stop it first, or give this one "
                "its own data directory (EVC_DATA_DIR)"
            )
        check_port_free(s.api_bind)
        if self.adopt_orphans:
            reaper.become_subreaper()

    def _configure(self) -> Path:
        """This run's settings: a new instance id, the SSH key pair, the embedded Redis unless
        one is configured, a clean metrics directory (returned)."""
        self.instance_id = secrets.token_urlsafe(24)
        s = self.settings = self.settings.replace(instance_id=self.instance_id)
        keys.ensure_keypair(s)
        if not s.redis_url and not s.redis_sentinels:
            rdir = s.data_dir / "redis"
            self.redis = RedisServer(rdir, password=private_password(rdir / "password")).start()
            s = self.settings = s.replace(redis_url=self.redis.url)
        metrics_dir = Path(s.metrics_dir) if s.metrics_dir else s.data_dir / "metrics"
        for role in ("api", "workers"):  # files an earlier run left would be merged into this one's
            metrics.reset_multiprocess_dir(metrics.multiprocess_dir(metrics_dir, role))
        self.settings = s.replace(metrics_dir=str(metrics_dir))
        if self.sim_devices and not s.device_sysroot:  # the simulated fleet's playbooks leave /etc alone
            self.settings = self.settings.replace(device_sysroot=str(sim_sysroot(s.data_dir)))
        return metrics_dir

    def _prepare_store(self) -> None:
        """Check Redis answers; record what `evc flower` needs; make sure of the admin token."""
        s = self.settings
        store = Store.from_settings(s)
        store.ping()
        flower.record_broker(s)  # `evc flower` finds the running stack's broker here
        flower.credential(s)  # and its basic-auth credential, there from the start
        token = ensure_admin_token(store, s)
        token_file = s.data_dir / "admin-token"
        self.admin_token = token or (token_file.read_text().strip() if token_file.exists() else "")

    def _spawn_services(self, metrics_dir: Path) -> dict[str, str]:
        """Start the API, a worker, beat and (asked for) Flower; the workers' environment."""
        s = self.settings
        env = {**os.environ, **settings_env(s), **metrics.multiprocess_env(str(metrics_dir), "workers")}
        api_env = {**env, **metrics.multiprocess_env(str(metrics_dir), "api")}
        py = sys.executable
        celery = [py, "-m", "celery", "-A", "evc.workers.app"]
        self._spawn("api", [
            py, "-m", "gunicorn", "-c", "python:evc.api.gunicorn_conf", "-w", str(self.api_workers),
            "--threads", "8",  # threaded workers: the console's live event streams do not hold a whole worker
            "-b", s.api_bind, "--access-logfile", "-", "evc.api.wsgi:app",
        ], api_env)  # fmt: skip
        self._spawn("worker", [
            *celery, "worker", "-Q", "default,ssh,ansible", "-c", str(self.worker_concurrency),
            "-l", "INFO", "-n", "evc-worker@%h",
        ], env)  # fmt: skip
        # federated rounds: a threads pool, whose one process keeps every FL client channel
        # (bench/fl_evc.py --compare-pools: 3x faster rounds at 10 devices than prefork, 10x at 20)
        self._spawn("fl-worker", [
            *celery, "worker", "-Q", "fl", "-P", "threads", "-c", str(self.fl_worker_threads),
            "-l", "INFO", "-n", "evc-fl@%h",
        ], env)  # fmt: skip
        self._spawn("beat", [*celery, "beat", "-l", "INFO", "-s", str(s.data_dir / "beat-schedule")], env)
        if self.flower_port:  # loopback, basic auth with the credential in <data dir>/flower-auth
            fl = flower.launch(s, self.flower_port)
            self._spawn("flower", fl.argv, {**env, "FLOWER_BASIC_AUTH": fl.env["FLOWER_BASIC_AUTH"]})
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str], umask: int = 0o077) -> None:
        assert self.log_dir is not None
        logf = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
        proc = subprocess.Popen(
            args, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, umask=umask
        )
        self.children.append(Child(name, proc))
        self._write_state()

    def _write_state(self) -> None:
        s = self.settings
        state = {
            "pid": os.getpid(),
            "api_url": s.api_url,
            "redis_port": self.redis.port if self.redis else None,
            "components": {c.name: c.proc.pid for c in self.children},
        }
        write_private(s.data_dir / STATE_FILE, json.dumps(state, indent=1) + "\n")

    def log_of(self, name: str) -> Path:
        if name == "redis" and self.redis:
            return self.redis.data_dir / "redis.log"
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def _check_children(self) -> None:
        """Raise ComponentDied for the first component that has ended."""
        procs = [(c.name, c.proc) for c in self.children]
        if self.redis and self.redis.proc:
            procs.insert(0, ("redis", self.redis.proc))
        for name, proc in procs:
            rc = proc.poll()
            if rc is not None:
                how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
                raise ComponentDied(
                    f"{name} {how}; see {self.log_of(name)}", component=name, log=str(self.log_of(name))
                )

    def _wait_own_api(self, timeout: float = 30.0) -> None:
        """Wait until the API answers on its bind address with this run's instance id."""
        import requests

        url = self.local_url + "/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._check_children()
            except ComponentDied as exc:
                raise ConfigError(f"{exc.message} (at start)") from exc
            try:
                resp = requests.get(url, timeout=1)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            check_instance(url, resp, self.instance_id)
            return
        raise ConfigError(f"the API did not answer at {url}; see {self.log_of('api')}")

    def _start_sim(self, env: dict[str, str]) -> None:
        from evc import simulator
        from evc.client import Client

        simulator.require()
        s = self.settings
        root = s.data_dir / "sim"
        root.mkdir(mode=0o700, exist_ok=True)
        state = self.sim_state = root / "devices.json"
        ports_file = root / "ports.json"
        state.unlink(missing_ok=True)
        pub = s.key_path.with_suffix(".pub")
        self._spawn(
            "sim",
            [
                sys.executable, "-m", "evc.cli", "sim", "--devices", str(self.sim_devices),
                "--root", str(root), "--state-file", str(state), "--authorized-keys", str(pub),
                "--ports-file", str(ports_file),
            ],
            env,
            umask=DEVICE_UMASK,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not state.exists():
            self._check_children()
            if time.monotonic() > deadline:
                raise ConfigError(f"the simulator did not start; see {self.log_of('sim')}")
            time.sleep(0.1)
        devices: list[dict[str, Any]] = json.loads(state.read_text())["devices"]
        write_private(ports_file, json.dumps({d["name"]: d["port"] for d in devices}, indent=1) + "\n")
        client = Client(self.local_url, self.admin_token)
        existing = {d["name"]: d for d in client.get("/api/v1/devices", limit=500)["items"]}
        for d in devices:
            known = existing.get(d["name"])
            if known and (known["host"], known["port"], known["username"]) == (d["host"], d["port"], d["username"]):
                continue
            if known:  # its port was taken: register it again where it is now
                log.warning("simulated device %s moved to %s:%s; registering it again", d["name"], d["host"], d["port"])
                client.delete(f"/api/v1/devices/{known['id']}")
            client.post("/api/v1/devices", {
                "name": d["name"], "host": d["host"], "port": d["port"], "username": d["username"],
                "labels": {"sim": "true", "privilege": d.get("privilege", "user")},
            })  # fmt: skip

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM (returns) or a component dies (raises ComponentDied)."""
        stop = {"now": False}

        def handler(signum: int, frame: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        known = self._known_pids()
        while not stop["now"]:
            self._check_children()
            if self.adopt_orphans:
                reaper.reap_adopted(known)
            time.sleep(0.5)

    def _known_pids(self) -> set[int]:
        pids = {c.proc.pid for c in self.children}
        if self.redis and self.redis.proc:
            pids.add(self.redis.proc.pid)
        return pids

    def stop(self) -> None:
        for c in reversed(self.children):
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        for c in reversed(self.children):
            try:
                c.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
        self.children.clear()
        flower.forget_broker(self.settings)
        if self.redis:
            self.redis.stop()
            self.redis = None
        if self.adopt_orphans:
            reaper.end_adopted(known=())
        if read_state(self.settings.data_dir).get("pid") == os.getpid():  # ours, not another stack's
            (self.settings.data_dir / STATE_FILE).unlink(missing_ok=True)


def make_private(data_dir: Path) -> None:
    """Make *data_dir* 0700 and take group/other access away from everything in it (the
    simulated devices' home directories excepted: they stand for other machines)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    homes = data_dir / "sim" / "homes"
    for root, dirs, files in os.walk(data_dir):
        if Path(root) == homes:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def sim_sysroot(data_dir: Path) -> Path:
    """Where the playbooks stage the system paths of `evc up --sim`'s devices (settings
    ``device_sysroot``: ``<it>/<device id>/etc/...``), made when absent: a folder every simulated
    account can reach and write (sticky: each device's account makes its own), outside the
    private data directory when running as root (``/var/lib/evcsim/sysroots/<digest>``)."""
    if os.geteuid() != 0:
        path = data_dir / "sim" / "sysroot"
    else:
        path = Path("/var/lib/evcsim/sysroots") / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
        for parent in (path.parent.parent, path.parent):
            parent.mkdir(mode=0o755, exist_ok=True)
        path.parent.chmod(0o755)  # ours; mkdir's mode went through the stack's umask (077)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o1777)
    return path


def split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - what an empty host means
    except ValueError:
        raise ConfigError(f"bind address {bind!r} is not HOST:PORT") from None


def local_url(bind: str) -> str:
    """http:// URL of a bind address as seen from this machine (wildcards become loopback)."""
    host, port = split_bind(bind)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(bind: str) -> None:
    """Raise ConfigError when something listens on the API's bind address already."""
    host, port = split_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    taken = ""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as exc:
            taken = exc.strerror or str(exc)
    if not taken:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((urlsplit(local_url(bind)).hostname or host, port)) == 0:
                taken = "something accepts connections there"
    if taken:
        raise ConfigError(
            f"the API address {bind} is in use ({taken}): another program, or another `evc up`, "
            "listens there. Stop it, or choose another address with --bind HOST:PORT "
            "(port 0 picks a free one)."
        )


def check_instance(url: str, resp: Any, instance_id: str) -> None:
    """Raise ConfigError unless *resp* (from /healthz) comes from the API with *instance_id*."""
    try:
        got = resp.json().get("instance") if resp.ok else None
    except ValueError:
        got = None
    if not got or not secrets.compare_digest(str(got), instance_id):
        raise ConfigError(
            f"the server answering at {url} is not the API this `evc up` started (its instance id "
            "does not match): another program holds the port. EVC stops without using its admin token."
        )


def read_state(data_dir: Path) -> dict[str, Any]:
    """What a running (or crashed) `evc up` on *data_dir* wrote about itself; {} if nothing."""
    try:
        data = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def running_stack(data_dir: Path) -> int | None:
    """The pid of another `evc up` that is running on *data_dir*, if one is."""
    pid = read_state(data_dir).get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        cmdline = (reaper.PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"evc" in cmdline and b"up" in cmdline else None


def read_ports(path: Path) -> dict[str, int]:
    """The {device name: port} a previous simulator run saved ({} when there is none)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read simulated device ports from {path}: {exc}") from exc
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


@contextlib.contextmanager
def local_redis(settings: Settings) -> Iterator[Settings]:
    """Settings that reach this data directory's Redis: the configured one; else the embedded
    Redis of a running `evc up`; else the embedded Redis, started here for the duration."""
    if settings.redis_url or settings.redis_sentinels:
        yield settings
        return
    make_private(settings.data_dir)
    rdir = settings.data_dir / "redis"
    password = private_password(rdir / "password")
    port = read_state(settings.data_dir).get("redis_port")
    if port:
        url = f"redis://:{password}@127.0.0.1:{int(port)}/0"
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            client.ping()
        except redis.RedisError:
            pass
        else:
            yield settings.replace(redis_url=url)
            return
        finally:
            client.close()
    old = os.umask(0o077)
    try:
        srv = RedisServer(rdir, password=password).start()
    finally:
        os.umask(old)
    try:
        yield settings.replace(redis_url=srv.url)
    finally:
        srv.stop()


def redacted(url: str) -> str:
    """*url* without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()


def pick_port(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    if port == "0":
        return f"{host}:{free_port(host.strip('[]'))}"
    return bind
