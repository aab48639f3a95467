"""Tokens never go to the wrong server, the last-admin recovery, and the process-tree helpers
of `evc up`: fast tests against real servers (HTTP, Redis)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from evc import auth, reaper
from evc.cli import main
from evc.client import is_local_url
from evc.errors import AuthError, ConfigError
from evc.settings import Settings, load_settings
from evc.stack import Stack, local_redis
from evc.store import Store
from tests.fixtures.helpers import own_address


class Recorder(BaseHTTPRequestHandler):
    """Answers every GET like an EVC API would, recording the Authorization header it got."""

    seen: list[str | None] = []
    body: dict[str, Any] = {"status": "ok"}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen.append(self.headers.get("Authorization"))
        status = 401 if self.path.startswith("/api/") and not self.headers.get("Authorization") else 200
        data = json.dumps({"message": "missing bearer token"} if status == 401 else self.body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[ThreadingHTTPServer, type[Recorder]]]:
    handler = type("R", (Recorder,), {"seen": [], "body": {"status": "ok", "items": [], "total": 0}})
    srv = ThreadingHTTPServer(("0.0.0.0", 0), handler)  # noqa: S104 - reached by a non-loopback address too
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, handler
    srv.shutdown()
    srv.server_close()


# ----------------------------------------------------------------------------- point 7
def test_local_url() -> None:
    assert is_local_url("http://127.0.0.1:8080") and is_local_url("http://127.3.2.1")
    assert (
        is_local_url("http://[::1]:8080/x") and is_local_url("http://localhost:1") and is_local_url("http://LOCALHOST.")
    )
    assert is_local_url("http://0.0.0.0:8080") and is_local_url("http://[::]:8080")  # both reach this machine
    for url in (
        "http://192.0.2.5:8080",
        "https://evc.example.com",
        "http://localhost.evil.example",
        "",
    ):
        assert not is_local_url(url), url


def test_the_local_admin_token_goes_only_to_this_machine(tmp_path: Path, recorder: Any) -> None:
    srv, handler = recorder
    (tmp_path / "admin-token").write_text("evco_localadmin\n")
    env = {"EVC_DATA_DIR": str(tmp_path), "EVC_URL": None, "EVC_TOKEN": None}
    port = srv.server_address[1]

    res = CliRunner().invoke(main, ["--url", f"http://127.0.0.1:{port}", "device", "list"], env=env)
    assert res.exit_code == 0, res.output
    assert handler.seen[-1] == "Bearer evco_localadmin"

    addr = own_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address to stand for a remote EVC")
    handler.seen.clear()
    res = CliRunner().invoke(main, ["--url", f"http://{addr}:{port}", "device", "list"], env=env)
    assert res.exit_code != 0
    assert handler.seen == [None]  # asked without the local admin token
    assert "only sent to EVC on this machine" in res.output and "--token" in res.output
    # given explicitly, a token goes where it is told
    res = CliRunner().invoke(
        main, ["--url", f"http://{addr}:{port}", "device", "list"], env={**env, "EVC_TOKEN": "evco_given"}
    )
    assert res.exit_code == 0, res.output
    assert handler.seen[-1] == "Bearer evco_given"


def test_healthz_returns_the_instance_id(settings: Settings) -> None:
    from evc.api.app import create_app

    body = create_app(settings.replace(instance_id="run-123")).test_client().get("/healthz").get_json()
    assert body == {"status": "ok", "instance": "run-123"}


def test_a_server_that_is_not_this_stacks_api_is_refused(settings: Settings, recorder: Any) -> None:
    srv, handler = recorder
    stack = Stack(settings.replace(api_bind=f"127.0.0.1:{srv.server_address[1]}"), instance_id="mine")
    for body in ({"status": "ok"}, {"status": "ok", "instance": "theirs"}):
        handler.body = body
        with pytest.raises(ConfigError, match="not the API this `evc up` started"):
            stack._wait_own_api(timeout=5)
    handler.body = {"status": "ok", "instance": "mine"}
    stack._wait_own_api(timeout=5)
    assert all(h is None for h in handler.seen)  # and no token was sent while checking


# ----------------------------------------------------------------------------- point 13
def test_bootstrap_reset_admin_recovers_from_losing_every_admin_token(tmp_path: Path) -> None:
    data = tmp_path / "evc"
    env = {"EVC_DATA_DIR": str(data), "EVC_REDIS_URL": None, "EVC_REDIS_SENTINELS": None, "COLUMNS": "300"}
    help_text = CliRunner().invoke(main, ["bootstrap", "--help"], env=env).output
    assert "--reset-admin" in help_text and "Lost or revoked every admin token" in help_text

    res = CliRunner().invoke(main, ["bootstrap"], env=env)  # the embedded Redis, started for the command
    assert res.exit_code == 0, res.output
    assert "admin token: created" in res.output and "--reset-admin" in res.output
    first = (data / "admin-token").read_text().strip()
    settings = load_settings(env={}, data_dir=data)
    with local_redis(settings) as s:  # every admin token revoked (in the store, whatever the API allows)
        store = Store.from_settings(s)
        assert auth.authenticate(store, s, f"Bearer {first}").allows("admin")
        for rec in store.list_tokens(limit=1000)[0]:
            store.update_token(rec["id"], revoked=True)
        with pytest.raises(AuthError):
            auth.authenticate(store, s, f"Bearer {first}")
    (data / "admin-token").unlink()  # and the file lost

    res = CliRunner().invoke(main, ["bootstrap", "--reset-admin"], env=env)
    assert res.exit_code == 0, res.output
    assert "new admin token" in res.output and str(data / "admin-token") in res.output.replace("\n", "")
    token_file = data / "admin-token"
    new = token_file.read_text().strip()
    assert new != first and token_file.stat().st_mode & 0o777 == 0o600
    with local_redis(settings) as s:
        store = Store.from_settings(s)
        assert auth.authenticate(store, s, f"Bearer {new}").allows("admin")
        assert any(e["action"] == "token.reset-admin" for e in store.audit_log()[0])
    assert data.stat().st_mode & 0o777 == 0o700
    assert not any(p.is_socket() for p in data.rglob("*"))  # the Redis it started is gone again


# ----------------------------------------------------------------------------- reaper
def test_reaper_reads_proc_stat_and_walks_descendants() -> None:
    info = reaper.read_stat("4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 ...")
    assert (info.pid, info.ppid, info.state) == (4242, 17, "S")
    table = [
        reaper.ProcInfo(2, 1, "S"),
        reaper.ProcInfo(3, 2, "S"),
        reaper.ProcInfo(4, 3, "Z"),
        reaper.ProcInfo(5, 1, "S"),
    ]
    assert [p.pid for p in reaper.descendants(2, table)] == [3, 4]
    me = [p for p in reaper.processes() if p.pid == os.getpid()]
    assert me and me[0].ppid == os.getppid()
