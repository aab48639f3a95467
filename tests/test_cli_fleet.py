"""The CLI reads well, over real HTTP: names for ids, human views, fleet import, retry, vars,
enrollments, audit, events --follow, health reasons, --version and completion."""

from __future__ import annotations

import json
import re
import time

import pytest
from click.testing import CliRunner

from evc.cli import main
from tests.fixtures.cli import run

pytestmark = pytest.mark.integration


def _inventory(tmp_path, devices, group: str = "cams") -> str:
    path = tmp_path / "fleet.ini"
    path.write_text(
        f"[{group}]\n"
        + "".join(f"{d.name} ansible_host={d.host} ansible_port={d.port} ansible_user={d.username}\n" for d in devices)
    )
    return str(path)


def test_version_and_shell_completion() -> None:
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("evc ")
    res = CliRunner().invoke(main, [], prog_name="evc", env={"_EVC_COMPLETE": "bash_source"})
    assert res.exit_code == 0 and "_evc_completion" in res.output
    assert "_EVC_COMPLETE=bash_source evc" in CliRunner().invoke(main, ["--help"]).output


def test_ssh_key_install_command_is_one_unwrapped_line(live, api) -> None:
    code, out = run(live, api.admin, "ssh-key")
    _, raw = run(live, api.admin, "--json", "ssh-key")
    command = json.loads(raw)["install_command"]
    assert code == 0 and len(command) > 80
    assert command in out.splitlines()


def test_import_by_name_human_views_and_retry(live, api, worker, simulator, sim_devices, tmp_path) -> None:
    devices = sim_devices(3, privilege="user")
    inventory = _inventory(tmp_path, devices)

    code, out = run(live, api.admin, "device", "import", inventory, "--dry-run")
    assert code == 0 and out.count("create") >= 3 and "dry run" in out, out
    code, out = run(live, api.admin, "device", "import", inventory)
    assert code == 0, out
    assert "import job" in out and "succeeded" in out
    for d in devices:
        assert d.name in out
    code, out = run(live, api.admin, "device", "import", inventory)
    assert code == 0 and out.count("unchanged") >= 3, out

    # ids never cut; names wherever ids are; times human, raw in --json
    _, raw = run(live, api.admin, "--json", "device", "list", "--label", "cams=true")
    listed = json.loads(raw)["items"]
    code, out = run(live, api.admin, "device", "list", "--label", "cams=true")
    assert code == 0 and all(d["id"] in out and d["name"] in out for d in listed) and "…" not in out
    words = f"evc --url {live} --token {api.reader} device show {devices[0].name[:-1]}"
    env = {"_EVC_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "7"}
    complete = CliRunner().invoke(main, [], prog_name="evc", env=env)
    assert f"plain,{devices[0].name}" in complete.output, complete.output
    code, out = run(live, api.reader, "device", "show", devices[0].name)
    assert code == 0 and devices[0].name in out and "state=online" in out
    code, out = run(live, api.admin, "device", "show", "no-such-device")
    assert code == 2 and "no device is named 'no-such-device'" in out
    code, out = run(live, api.admin, "job", "list", "--kind", "import", "--limit", "1")
    assert code == 0 and "s ago" in out and "3/3 (100%)" in out
    _, raw = run(live, api.admin, "--json", "job", "list", "--kind", "import", "--limit", "1")
    job = json.loads(raw)["items"][0]
    assert isinstance(job["created_at"], float)
    code, out = run(live, api.admin, "job", "show", job["id"])
    assert code == 0 and "import job" in out and "succeeded" in out and "privilege user" in out
    assert all(d.name in out for d in devices)

    # a registration that failed is retried by name, no remove-and-add
    (locked,) = sim_devices(1, privilege="user")
    simulator.set_fault(locked.name, "refuse_auth")
    code, out = run(live, api.admin, "device", "add", locked.name, "--host", locked.host,
                    "--port", str(locked.port), "--user", locked.username)  # fmt: skip
    assert code == 1, out
    simulator.set_fault(locked.name, "ok")
    code, out = run(live, api.admin, "device", "retry", locked.name)
    assert code == 0 and "succeeded" in out, out

    # Ansible's task per host in the progress output
    code, out = run(live, api.admin, "provision", "facts", "--device", devices[0].name)
    assert code == 0 and f"{devices[0].name}: TASK" in out, out


def test_cluster_show_vars_by_name(live, api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1, privilege="user")
    _, out = run(live, api.admin, "--json", "device", "add", dev.name, "--host", dev.host, "--port", str(dev.port),
                 "--user", dev.username)  # fmt: skip
    name = f"clv{time.time_ns()}"
    code, _ = run(live, api.admin, "cluster", "create", name, "--profile", "direct")
    assert code == 0
    code, out = run(live, api.admin, "cluster", "add", name, dev.name)
    assert code == 0, out
    code, out = run(live, api.admin, "cluster", "vars", name, "--set", "devenv.packages=[\"numpy\"]",
                    "--set", "devenv.path=~/venv")  # fmt: skip
    assert code == 0 and "devenv" in out and "numpy" in out, out
    code, out = run(live, api.admin, "cluster", "vars", name, "--unset", "devenv.path")
    assert code == 0 and "~/venv" not in out
    code, out = run(live, api.admin, "cluster", "show", name)
    assert code == 0 and name in out and dev.name in out and "profile direct" in out and "packages" in out, out


def test_enrollments_audit_and_events_follow(live, api) -> None:
    _, raw = run(live, api.admin, "--json", "token", "enroll", "--uses", "2")
    enr = json.loads(raw)
    code, out = run(live, api.admin, "token", "enrollments")
    assert code == 0 and enr["id"] in out and "in " in out  # expires in …
    code, out = run(live, api.admin, "token", "revoke-enrollment", enr["id"])
    assert code == 0 and "revoked" in out
    _, raw = run(live, api.admin, "--json", "token", "enrollments")
    assert next(e for e in json.loads(raw)["items"] if e["id"] == enr["id"])["revoked"] is True
    code, out = run(live, api.admin, "audit", "--limit", "5")
    assert code == 0 and "ago" in out and enr["id"] in out and "DELETE" in out, out

    api.store.log_event({"type": "device.state", "device": "dev_x", "name": "followed-one", "from": "online",
                         "to": "degraded", "reason": "cpu 99% > 95%"})  # fmt: skip
    t0 = time.monotonic()
    code, out = run(live, api.reader, "events", "--follow", "--for", "1.5", "--type", "device.state")
    assert code == 0 and "followed-one online → degraded (cpu 99% > 95%)" in out, out
    assert 1.4 < time.monotonic() - t0 < 10


def test_health_names_devices_and_says_why(live, api, worker, simulator, sim_devices) -> None:
    good, down = sim_devices(2, privilege="user")
    for d in (good, down):
        code, out = run(live, api.admin, "device", "add", d.name, "--host", d.host, "--port", str(d.port),
                        "--user", d.username)  # fmt: skip
        assert code == 0, out
    simulator.set_fault(down.name, "down")
    code, out = run(live, api.admin, "health", "--device", good.name, "--device", down.name)
    assert good.name in out and down.name in out, out
    # the sweep ran, so the command succeeded: a device it could not reach is a finding, not a failure
    assert code == 0, out
    text = " ".join(out.split())  # rich wraps the why column; rows stay in order
    why = rf"unreachable: {down.username}@{down.host}:{down.port} refused the connection"
    assert re.search(rf"{down.name} dev_\w+ (degraded|offline) {re.escape(why)}", text), out
    # the reachable one is online ("ok") or says which threshold it breaches (a busy test machine)
    assert re.search(rf"{good.name} dev_\w+ (online ok|degraded \S+)", text), out
    assert "2 device(s) checked" in text, out


def test_job_show_has_check_mode_drift(live, api, worker, sim_devices) -> None:
    (dev,) = sim_devices(1, privilege="user")
    code, out = run(live, api.admin, "device", "add", dev.name, "--host", dev.host, "--port", str(dev.port),
                    "--user", dev.username)  # fmt: skip
    assert code == 0, out
    code, out = run(live, api.admin, "--json", "provision", "devenv", "--device", dev.name, "--check",
                    "--var", "workspace=cli-drift", "--var", "packages=[]")  # fmt: skip
    job = json.loads(out)
    assert code == 0 and job["results"], out
    code, out = run(live, api.admin, "job", "show", job["id"])
    assert code == 0 and f"drift on {dev.name}" in out and "Workspace directory" in out, out
    assert not (dev.home / "cli-drift").exists()
