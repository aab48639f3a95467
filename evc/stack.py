"""`evc up`: run the whole stack on one machine — Redis (embedded unless configured), the API
under gunicorn, a worker, beat, optionally Flower and a simulated fleet — and stop it cleanly."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evc import flower, keys, metrics
from evc.auth import ensure_admin_token
from evc.embedded import RedisServer, free_port
from evc.errors import ConfigError
from evc.settings import Settings, settings_env
from evc.store import Store

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


@dataclass
class Stack:
    """The processes of a local EVC, started in order and stopped in reverse."""

    settings: Settings
    api_workers: int = 2
    worker_concurrency: int = 4
    flower_port: int | None = None
    sim_devices: int = 0
    log_dir: Path | None = None
    redis: RedisServer | None = None
    children: list[Child] = field(default_factory=list)
    admin_token: str = ""
    sim_state: Path | None = None

    def start(self) -> Stack:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.log_dir or s.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        keys.ensure_keypair(s)
        if not s.redis_url and not s.redis_sentinels:
            self.redis = RedisServer(s.data_dir / "redis").start()
            s = self.settings = s.replace(redis_url=self.redis.url)
        metrics_dir = Path(s.metrics_dir) if s.metrics_dir else s.data_dir / "metrics"
        for role in ("api", "workers"):  # files an earlier run left would be merged into this one's
            metrics.reset_multiprocess_dir(metrics.multiprocess_dir(metrics_dir, role))
        s = self.settings = s.replace(metrics_dir=str(metrics_dir))
        store = Store.from_settings(s)
        store.ping()
        flower.record_broker(s)  # `evc flower` finds the running stack's broker here
        token = ensure_admin_token(store, s)
        token_file = s.data_dir / "admin-token"
        self.admin_token = token or (token_file.read_text().strip() if token_file.exists() else "")
        env = {**os.environ, **settings_env(s), **metrics.multiprocess_env(str(metrics_dir), "workers")}
        api_env = {**env, **metrics.multiprocess_env(str(metrics_dir), "api")}
        py = sys.executable
        self._spawn(
            "api",
            [
                py,
                "-m",
                "gunicorn",
                "-c",
                "python:evc.api.gunicorn_conf",
                "-w",
                str(self.api_workers),
                "-b",
                s.api_bind,
                "--access-logfile",
                "-",
                "evc.api.wsgi:app",
            ],
            api_env,
        )
        self._spawn(
            "worker",
            [
                py,
                "-m",
                "celery",
                "-A",
                "evc.workers.app",
                "worker",
                "-Q",
                "default,ssh,ansible,fl",
                "-c",
                str(self.worker_concurrency),
                "-l",
                "INFO",
                "-n",
                "evc-worker@%h",
            ],
            env,
        )
        self._spawn(
            "beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "evc.workers.app",
                "beat",
                "-l",
                "INFO",
                "-s",
                str(s.data_dir / "beat-schedule"),
            ],
            env,
        )
        if self.flower_port:  # loopback, basic auth with the credential in <data dir>/flower-auth
            fl = flower.launch(s, self.flower_port)
            self._spawn("flower", fl.argv, {**env, "FLOWER_BASIC_AUTH": fl.env["FLOWER_BASIC_AUTH"]})
        self._wait_http(s.api_url + "/healthz")
        if self.sim_devices:
            self._start_sim(env)
        return self

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        assert self.log_dir is not None
        logf = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child's lifetime
        proc = subprocess.Popen(args, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(Child(name, proc))

    def _wait_http(self, url: str, timeout: float = 30.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in self.children:
                if c.proc.poll() is not None:
                    raise ConfigError(f"{c.name} exited at start; see {self.log_dir}/{c.name}.log")
            try:
                if requests.get(url, timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise ConfigError(f"the API did not answer at {url}; see {self.log_dir}/api.log")

    def _start_sim(self, env: dict[str, str]) -> None:
        from evc.client import Client

        s = self.settings
        state = self.sim_state = s.data_dir / "sim" / "devices.json"
        state.unlink(missing_ok=True)
        pub = s.key_path.with_suffix(".pub")
        self._spawn(
            "sim",
            [
                sys.executable,
                "-m",
                "evc.cli",
                "sim",
                "--devices",
                str(self.sim_devices),
                "--root",
                str(s.data_dir / "sim"),
                "--state-file",
                str(state),
                "--authorized-keys",
                str(pub),
            ],
            env,
        )
        deadline = time.monotonic() + 60
        while not state.exists():
            if time.monotonic() > deadline:
                raise ConfigError(f"the simulator did not start; see {self.log_dir}/sim.log")
            time.sleep(0.1)
        devices: list[dict[str, Any]] = json.loads(state.read_text())["devices"]
        client = Client(s.api_url, self.admin_token)
        existing = {d["name"] for d in client.get("/api/v1/devices", limit=500)["items"]}
        for d in devices:
            if d["name"] in existing:
                continue
            client.post("/api/v1/devices", {
                "name": d["name"], "host": d["host"], "port": d["port"], "username": d["username"],
                "labels": {"sim": "true", "privilege": d.get("privilege", "user")},
            })  # fmt: skip

    def wait(self) -> None:
        """Block until a signal or a child dies."""
        stop = {"now": False}

        def handler(signum: int, frame: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        while not stop["now"]:
            for c in self.children:
                if c.proc.poll() is not None:
                    log.error("%s exited with %s; stopping", c.name, c.proc.returncode)
                    return
            time.sleep(0.5)

    def stop(self) -> None:
        for c in reversed(self.children):
            if c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for c in reversed(self.children):
            try:
                c.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
        self.children.clear()
        flower.forget_broker(self.settings)
        if self.redis:
            self.redis.stop()
            self.redis = None


def pick_port(bind: str) -> str:
    host, _, port = bind.rpartition(":")
    if port == "0":
        return f"{host}:{free_port(host)}"
    return bind
