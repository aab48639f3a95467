"""Provisioning's pure core: catalog, names, parameters, inventory, privilege gating, events."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from evc.errors import ConfigError, NotFound, ValidationError
from evc.provisioning import params
from evc.provisioning.catalog import Catalog, builtin_dir, validate_name
from evc.provisioning.inventory import job_inventory, render, unsafe_vars
from evc.provisioning.request import (
    ProvisionRequest,
    RetryPolicy,
    gate,
    resolve_artifacts,
)
from evc.provisioning.runner import EventStream
from evc.settings import load_settings

BUILTIN = {"facts", "devenv", "container-runtime", "k3s-server", "k3s-agent", "cleanup"}
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILofCGkK8eMyN24ZTL5euYBQVAqiqok8xA3AgEqZ7GSu"


def catalog(*extra: Path) -> Catalog:
    return Catalog([(builtin_dir(), "builtin"), *((d, "operator") for d in extra)])


def device(i: int = 1, **kw: Any) -> dict[str, Any]:
    dev = {
        "id": f"dev_{i:04d}", "name": f"edge-{i}", "host": "127.0.0.1", "port": 2200 + i,
        "username": "pi", "privilege": "user", "state": "online", "host_key": KEY,
        "labels": {"site": "lab"}, "jump_host": None, "facts": {},
    }  # fmt: skip
    dev.update(kw)
    return dev


# ------------------------------------------------------------------------------- catalog
def test_builtin_catalog_has_described_playbooks_with_schemas() -> None:
    specs = {s.name: s for s in catalog().list()}
    assert BUILTIN <= set(specs)
    for s in specs.values():
        assert s.description and s.source == "builtin"
        assert s.schema["type"] == "object"
        params.check_schema(s.schema)
        pub = s.public()
        assert set(pub) == {
            "name",
            "description",
            "min_privilege",
            "params",
            "source",
            "tags",
            "check_mode",
        }
    assert specs["container-runtime"].min_privilege == "sudo"
    assert specs["k3s-server"].min_privilege == "sudo"
    assert specs["k3s-agent"].min_privilege == "sudo"
    assert specs["devenv"].min_privilege == "user"
    assert specs["k3s-agent"].artifact_params() == ["artifact", "images"]


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "a/b", "/etc/hosts", "devenv.yml", ".hidden", "", "DevEnv", "x" * 70, "a b"],
)
def test_playbook_names_are_never_paths(name: str) -> None:
    with pytest.raises(ValidationError):
        validate_name(name)
    with pytest.raises(ValidationError):
        catalog().get(name)


def test_unknown_playbook_is_404() -> None:
    with pytest.raises(NotFound):
        catalog().get("no-such-playbook")


def test_operator_directory(tmp_path: Path) -> None:
    (tmp_path / "hello.yml").write_text("- hosts: all\n  tasks: []\n")
    (tmp_path / "hello.meta.yml").write_text(
        "description: say hello\nmin_privilege: user\n"
        "params: {type: object, additionalProperties: false,\n"
        "         properties: {greeting: {type: string}}}\n"
    )
    (tmp_path / "bare.yml").write_text("- hosts: all\n  tasks: []\n")
    (tmp_path / "devenv.yml").write_text("- hosts: all\n  tasks: []\n")  # cannot shadow EVC's
    outside = tmp_path.parent / f"outside-{os.getpid()}.yml"
    outside.write_text("- hosts: all\n  tasks: []\n")
    (tmp_path / "escape.yml").symlink_to(outside)
    try:
        cat = catalog(tmp_path)
        names = cat.names()
        assert {"hello", "bare"} <= set(names) and names.count("devenv") == 1
        assert cat.get("devenv").source == "builtin"
        hello = cat.get("hello")
        assert hello.source == "operator" and hello.description == "say hello"
        assert hello.validate({"greeting": "hi"}) == {"greeting": "hi"}
        with pytest.raises(ValidationError):
            hello.validate({"other": 1})
        bare = cat.get("bare")
        assert bare.min_privilege == "user" and bare.validate({"anything": [1, 2]})
        with pytest.raises(NotFound):  # a symlink out of the directory is not a playbook
            cat.get("escape")
    finally:
        outside.unlink()


def test_bad_metadata_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yml").write_text("- hosts: all\n  tasks: []\n")
    (tmp_path / "bad.meta.yml").write_text("params: {type: object, oneOf: []}\n")
    with pytest.raises(ConfigError):
        catalog(tmp_path).get("bad")
    (tmp_path / "bad.meta.yml").write_text("min_privilege: superuser\n")
    with pytest.raises(ConfigError):
        catalog(tmp_path).get("bad")


def test_catalog_from_settings_reads_playbook_dirs(tmp_path: Path) -> None:
    (tmp_path / "mine.yml").write_text("- hosts: all\n  tasks: []\n")
    settings = load_settings(env={}, playbook_dirs=str(tmp_path))
    assert "mine" in Catalog.from_settings(settings).names()


# ------------------------------------------------------------------------------- parameters
def test_extra_vars_are_validated_with_defaults() -> None:
    devenv = catalog().get("devenv")
    out = devenv.validate({"packages": ["numpy==1.26.4", "requests[socks]>=2"]})
    assert out["workspace"] == "evc/workspace" and out["build_tools"] is True
    bad = {
        "packages": ["x; rm -rf /"],
        "build_tools": "yes",
        "workspace": "../../etc",
        "venv": "/abs/path",
        "unknown": 1,
    }
    with pytest.raises(ValidationError) as exc:
        devenv.validate(bad)
    errs = exc.value.details["errors"]
    assert set(errs) == {f"extra_vars.{k}" if k != "packages" else "extra_vars.packages[0]" for k in bad}


@pytest.mark.parametrize(
    "values",
    [
        {"ansible_ssh_common_args": "-o ProxyCommand=touch /tmp/pwned"},
        {"evc_sysroot": "/"},
        {"hostvars": {}},
        {"Bad-Name": 1},
        {"greeting": "{{ lookup('pipe', 'id') }}"},
        {"greeting": ["{% raw %}"]},
        {"greeting": {"nested": "{# comment #}"}},
    ],
)
def test_reserved_names_and_templates_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        params.validate(params.OPEN_SCHEMA, values, "open")


def test_types_are_strict() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    assert params.errors(schema, {"n": True})  # a bool is not an integer
    assert params.errors(schema, {"n": 0})
    assert not params.errors(schema, {"n": 3})
    assert params.secret_names(catalog().get("k3s-agent").schema) == ["token"]


def test_agent_requires_server_and_token() -> None:
    with pytest.raises(ValidationError) as exc:
        catalog().get("k3s-agent").validate({"artifact": "k3s"})
    assert set(exc.value.details["errors"]) == {"extra_vars.server_url", "extra_vars.token"}


def test_artifacts_stay_in_the_artifact_directory(tmp_path: Path) -> None:
    settings = load_settings(env={}, data_dir=tmp_path)
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "k3s").write_text("#!/bin/sh\n")
    (tmp_path / "secret").write_text("x")
    spec = catalog().get("k3s-server")
    ok = resolve_artifacts(spec, spec.validate({"artifact": "k3s"}), settings)
    assert ok["artifact"] == str((root / "k3s").resolve())
    for bad in ("../secret", str(tmp_path / "secret"), "missing", str(settings.key_path)):
        with pytest.raises(ValidationError):
            resolve_artifacts(spec, {"artifact": bad}, settings)


def test_request_parsing() -> None:
    req = ProvisionRequest.from_dict({"playbook": "facts", "targets": ["a"], "retry": {"max": 2}})
    assert req.lock == "wait" and req.retry.max == 2 and req.retry.on == ("failed", "unreachable")
    for bad in ({"lock": "maybe"}, {"forks": 0}, {"retry": {"max": 99}}, {"retry": {"on": ["ok"]}}):
        with pytest.raises(ValidationError):
            ProvisionRequest.from_dict({"playbook": "facts", **bad})
    assert RetryPolicy.from_dict(None).max == 0


# ------------------------------------------------------------------------------- privilege
@pytest.mark.parametrize(
    "playbook,allowed",
    [
        ("facts", {"user", "sudo", "root"}),
        ("devenv", {"user", "sudo", "root"}),
        ("cleanup", {"user", "sudo", "root"}),
        ("container-runtime", {"sudo", "root"}),
        ("k3s-server", {"sudo", "root"}),
        ("k3s-agent", {"sudo", "root"}),
    ],
)
def test_privilege_gating(playbook: str, allowed: set[str]) -> None:
    spec = catalog().get(playbook)
    devs = [device(i, privilege=p) for i, p in enumerate(("user", "sudo", "root", None), 1)]
    refused = gate(spec, devs)
    runnable = {d["privilege"] for d in devs if d["id"] not in refused}
    assert runnable == allowed
    for reason, message in refused.values():
        assert reason == "privilege" and playbook in message


def test_offline_and_unpinned_devices_are_refused() -> None:
    spec = catalog().get("facts")
    refused = gate(
        spec,
        [
            device(1, state="offline"),
            device(2, state="pending"),
            device(3, host_key=None),
            device(4),
        ],
    )
    assert refused["dev_0001"][0] == "offline" and refused["dev_0002"][0] == "offline"
    assert refused["dev_0003"][0] == "not_registered"
    assert "dev_0004" not in refused


# ------------------------------------------------------------------------------- inventory
def test_inventory_from_registry(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("private")
    jump = {"host": "10.0.0.1", "port": 2222, "username": "hop"}
    devs = [
        device(1, privilege="root"),
        device(2, privilege="sudo", jump_host=jump),
        device(3, host_key="ssh-ed25519 AAAA\n@cert-authority * ssh-rsa AAAA"),  # injection
        device(4, jump_host={"host": "10.9.9.9", "port": 22, "username": "x"}),  # unknown jump key
        device(5, username="bad user"),
    ]
    registry = [
        *devs,
        device(9, host="10.0.0.1", port=2222, host_key=KEY.replace("AAAAC3", "BBBBC3")),
    ]
    inv = render(devs, key, tmp_path / "job", registry, {"evc_public_key": "ssh-ed25519 K evc"})
    assert set(inv.hosts) == {"dev_0001", "dev_0002"}
    assert set(inv.refused) == {"dev_0003", "dev_0004", "dev_0005"}
    doc = json.loads(inv.inventory_path.read_text())
    h1, h2 = doc["all"]["hosts"]["dev_0001"], doc["all"]["hosts"]["dev_0002"]
    assert (h1["ansible_host"], h1["ansible_port"], h1["ansible_user"]) == ("127.0.0.1", 2201, "pi")
    assert h1["ansible_ssh_extra_args"] == "-o HostKeyAlias=dev_0001"
    assert h1["evc_become"] is False and h1["evc_can_admin"] is True
    assert h2["evc_become"] is True and "ProxyJump=evc-jump-0" in h2["ansible_ssh_extra_args"]
    assert doc["all"]["children"]["privilege_sudo"]["hosts"] == {"dev_0002": None}
    assert "label_site_lab" in doc["all"]["children"]
    known = inv.known_hosts.read_text().splitlines()
    assert f"dev_0001 {KEY}" in known
    assert any(line.startswith("evc-jump-0 ssh-ed25519 BBBBC3") for line in known)
    assert not any("cert-authority" in line for line in known)
    cfg = inv.ssh_config.read_text()
    assert "StrictHostKeyChecking yes" in cfg and f'IdentityFile "{key}"' in cfg
    assert "Host evc-jump-0\n  HostName 10.0.0.1\n  Port 2222\n  User hop" in cfg
    assert f'UserKnownHostsFile "{inv.known_hosts}"' in cfg
    assert "GlobalKnownHostsFile /dev/null" in cfg
    env = inv.env()
    assert env["ANSIBLE_HOST_KEY_CHECKING"] == "True" and env["ANSIBLE_PIPELINING"] == "True"
    assert inv.internal_vars_path.read_text() == 'evc_public_key: !unsafe "ssh-ed25519 K evc"\n'


def test_inventory_dir_is_private_and_removed(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAA")
    with job_inventory([device(1)], key, "job_abc", base_dir=tmp_path) as inv:
        root = inv.root
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert inv.inventory_path.is_file() and inv.known_hosts.is_file()
        assert key.read_text() not in "".join(p.read_text() for p in root.rglob("*") if p.is_file())
    assert not root.exists()
    with pytest.raises(ConfigError):
        with job_inventory([device(1)], tmp_path / "missing", "job_x", base_dir=tmp_path):
            pass


def test_unsafe_vars_refuses_foreign_names() -> None:
    assert unsafe_vars({"evc_probe": "{{ x }}", "evc_n": 3}) == 'evc_probe: !unsafe "{{ x }}"\nevc_n: 3\n'
    with pytest.raises(ConfigError):
        unsafe_vars({"ansible_user": "root"})


# ------------------------------------------------------------------------------- events
class Sink:
    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    def events(self, events: list[dict[str, Any]]) -> int:
        self.batches.append(events)
        return sum(len(b) for b in self.batches)


def ev(counter: int, event: str, **data: Any) -> dict[str, Any]:
    return {"counter": counter, "event": event, "uuid": str(counter), "event_data": data}


def test_event_stream_translates_tallies_and_batches() -> None:
    sink = Sink()
    stream = EventStream(sink, batch=4, max_delay_s=3600, secrets=["s3cret"])
    diff = {"before": {"state": "absent"}, "after": {"state": "directory"}, "after_header": "/x"}
    runner_events = [
        ev(1, "playbook_on_start"),
        ev(2, "playbook_on_task_start", task="Install", task_action="ansible.builtin.pip"),
        ev(3, "runner_on_ok", host="a", task="Install", res={"changed": True, "diff": diff}),
        ev(4, "runner_on_failed", host="b", task="Install", res={"msg": "boom s3cret"}),
        ev(5, "runner_on_unreachable", host="c", task="Install", res={"msg": "refused"}),
        ev(6, "runner_on_skipped", host="a", task="Other"),
        ev(7, "runner_item_on_ok", host="a", task="Loop", res={"item": "x", "changed": False}),
        ev(8, "runner_on_ok", host="a", task="F", res={"ansible_facts": {"evc_facts": "arch=x"}}),
        ev(9, "runner_on_failed", host="a", task="Soft", ignore_errors=True, res={"msg": "meh"}),
        {"counter": 10, "event": "verbose", "stdout": "ERROR! something broke", "event_data": {}},
        ev(11, "playbook_on_stats", ok={"a": 3}, changed={"a": 1}, failures={"b": 1}, dark={"c": 1},
           skipped={"a": 1}, ignored={"a": 1}, rescued={}, processed={"a": 1, "b": 1, "c": 1}),
    ]  # fmt: skip
    for e in runner_events:
        assert stream(e) is False  # nothing kept on disk
    stream.flush()
    out = [e for b in sink.batches for e in b]
    assert [e["counter"] for e in out] == list(range(1, 12))
    assert len(sink.batches) == 3  # 4 + 4 + 3
    by = {e["counter"]: e for e in out}
    assert by[3]["status"] == "changed" and by[3]["changed"] is True and by[3]["host"] == "a"
    assert by[4]["status"] == "failed" and by[4]["message"] == "boom ********"
    assert by[5]["status"] == "unreachable" and by[5]["message"] == "refused"
    assert by[6]["status"] == "skipped" and by[7]["item"] == "x"
    assert by[9]["status"] == "ignored"
    assert by[10]["message"] == "ERROR! something broke" and stream.error == by[10]["message"]
    assert by[11]["hosts"]["b"]["failed"] == 1
    a, b, c = stream.hosts["a"], stream.hosts["b"], stream.hosts["c"]
    assert (a.ok, a.changed, a.skipped, a.ignored, a.status) == (3, 1, 1, 1, "ok")
    assert a.changed_tasks[0]["task"] == "Install" and '+ "state": "directory"' in a.changed_tasks[0]["diff"]
    assert a.facts == {"probe": "arch=x"}
    assert (b.status, b.message) == ("failed", "boom ********")
    assert (c.status, c.unreachable) == ("unreachable", 1)


def test_event_stream_flushes_by_age() -> None:
    sink = Sink()
    stream = EventStream(sink, batch=1000, max_delay_s=0.0)
    stream(ev(1, "playbook_on_start"))
    stream(ev(2, "playbook_on_start"))
    assert len(sink.batches) == 2


def test_host_results_of_unfinished_runs() -> None:
    from evc.provisioning.runner import HostResult, RunOutcome
    from evc.provisioning.service import host_result

    done = RunOutcome("successful", 0, {}, 10, 1.0)
    ok = HostResult(ok=2, changed=1, changed_tasks=[{"task": "T", "action": "file", "diff": "d"}])
    assert host_result(ok, False, done) == {"status": "ok", **ok.counts(), "changed_tasks": ["T"]}
    drift = host_result(ok, True, done)
    assert drift["drift"] == ok.changed_tasks and drift["in_sync"] is False
    cancelled = RunOutcome("canceled", 254, {}, 3, 1.0, completed=False)
    assert host_result(ok, False, cancelled)["status"] == "cancelled"
    assert host_result(None, False, cancelled)["status"] == "cancelled"
    timeout = RunOutcome("timeout", 254, {}, 3, 1.0, error="", completed=False)
    res = host_result(ok, False, timeout)
    assert res["status"] == "failed" and "timeout" in res["message"]
    crashed = RunOutcome("failed", 1, {}, 1, 1.0, error="ERROR! the playbook could not be parsed")
    assert "could not be parsed" in host_result(None, False, crashed)["message"]
    assert host_result(HostResult(unreachable=1, message="no route"), False, done)["status"] == "unreachable"


def test_no_log_results_count_as_changed_only_with_a_diff() -> None:
    stream = EventStream(Sink(), max_delay_s=3600)
    hidden = {"censored": "the output has been hidden"}
    stream(ev(1, "runner_on_file_diff", host="a", task="Config", task_uuid="t1", diff=[{"after": "token: x"}]))
    stream(ev(2, "runner_on_ok", host="a", task="Config", task_uuid="t1", res=hidden))
    stream(ev(3, "runner_on_ok", host="a", task="Other", task_uuid="t2", res=hidden))
    a = stream.hosts["a"]
    assert [c["task"] for c in a.changed_tasks] == ["Config"] and "diff" not in a.changed_tasks[0]
    stream.flush()
    assert "token" not in json.dumps(stream.sink.batches)  # type: ignore[attr-defined]
