"""run_spec's own logic with a fake playbook run and an in-memory store: refusals, locks,
retries, per-host results, facts, the summary and the ansible-runner idents (no Ansible, no
Redis, no SSH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evc.jobs import JobRun, new_job
from evc.provisioning import service
from evc.provisioning.catalog import PlaybookSpec
from evc.provisioning.locks import DeviceLocks
from evc.provisioning.request import RetryPolicy
from evc.provisioning.runner import HostResult, RunOutcome
from evc.provisioning.service import ansible_ident, run_spec, step_runner
from evc.settings import load_settings
from evc.vault import MASK
from tests.fixtures.fakes import FakeStore, online_device

JSON = dict[str, Any]

SPEC = PlaybookSpec(
    "demo",
    Path("/nonexistent/demo.yml"),
    "a playbook that never runs",
    min_privilege="sudo",
    schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"password": {"type": "string", "secret": True}, "size": {"type": "integer", "default": 1}},
    },
)


class FakeAnsible:
    """Stands in for one ansible-runner run per call: each host's status per attempt."""

    def __init__(self, statuses: dict[str, list[str]], facts: JSON | None = None) -> None:
        self.statuses = statuses
        self.facts = facts
        self.calls: list[JSON] = []

    def __call__(self, settings, run, spec, values, devices, ident, check, forks, secret_values, internal):  # noqa: ANN001
        self.calls.append({"ident": ident, "hosts": [d["id"] for d in devices], "secrets": secret_values})
        hosts: dict[str, HostResult] = {}
        for d in devices:
            status = self.statuses[d["id"]][min(len(self.calls), len(self.statuses[d["id"]])) - 1]
            if status == "ok":
                hosts[d["id"]] = HostResult(ok=1, facts=self.facts)
            elif status == "failed":
                hosts[d["id"]] = HostResult(failed=1, message="task failed")
            elif status == "unreachable":
                hosts[d["id"]] = HostResult(unreachable=1, message="no route")
        return RunOutcome("successful", 0, hosts, 5, 0.1)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(service, "_internal_vars", lambda settings: {})
    monkeypatch.setattr(service, "_sleep", lambda seconds, run: None)
    settings = load_settings(env={}, data_dir=tmp_path)

    def make(devices: list[JSON], targets: list[str] | None = None) -> tuple[FakeStore, JobRun]:
        store = FakeStore(devices)
        job = new_job("provision", targets=targets or [d["id"] for d in devices])
        job["state"] = "running"
        store.put_job(job)
        return store, JobRun(store, store.get_job(job["id"]))  # type: ignore[arg-type]

    return settings, make


def test_refusals_come_before_the_run(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    devices = [online_device("ok1"), online_device("low", privilege="user"), online_device("off", state="offline")]
    store, run = make(devices, ["ok1", "low", "off", "gone"])
    ansible = FakeAnsible({"ok1": ["ok"]})
    monkeypatch.setattr(service, "_run_once", ansible)
    results, summary, cancelled = run_spec(store, settings, run, SPEC, ["ok1", "low", "off", "gone"], {})
    assert ansible.calls[0]["hosts"] == ["ok1"]
    assert {k: r["reason"] for k, r in results.items() if r["status"] == "refused"} == {
        "gone": "not_found", "low": "privilege", "off": "offline",
    }  # fmt: skip
    assert results["ok1"]["status"] == "ok" and results["ok1"]["attempts"] == 1
    assert summary["hosts"] == {
        "ok": 1, "failed": 0, "unreachable": 0, "refused": 3, "cancelled": 0, "total": 4, "changed": 0,
    }  # fmt: skip
    assert summary["playbook"] == "demo" and summary["attempts"] == 1 and not cancelled
    assert store.results(run.id) == results  # reported on the job
    assert run.job["progress"]["done"] == 4 and store.locks == {}  # locks released


def test_locked_devices_are_refused_without_waiting(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    store, run = make([online_device("a"), online_device("b")])
    DeviceLocks(store, "job_other").try_acquire("b")
    monkeypatch.setattr(service, "_run_once", FakeAnsible({"a": ["ok"]}))
    results, _, _ = run_spec(store, settings, run, SPEC, ["a", "b"], {}, lock="fail")
    assert results["b"]["reason"] == "locked" and "job_other" in results["b"]["message"]
    assert results["a"]["status"] == "ok"


def test_failed_hosts_are_retried_as_the_policy_says(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    store, run = make([online_device("a"), online_device("b"), online_device("c")])
    ansible = FakeAnsible({"a": ["ok"], "b": ["failed", "ok"], "c": ["unreachable", "unreachable", "unreachable"]})
    monkeypatch.setattr(service, "_run_once", ansible)
    policy = RetryPolicy(max=2, delay_s=0)
    results, summary, _ = run_spec(store, settings, run, SPEC, ["a", "b", "c"], {"password": "s3cret"}, policy=policy)
    assert [c["hosts"] for c in ansible.calls] == [["a", "b", "c"], ["b", "c"], ["c"]]
    assert [c["ident"] for c in ansible.calls] == [run.id, f"{run.id}-2", f"{run.id}-3"]
    assert ansible.calls[0]["secrets"] == ["s3cret"]
    assert (results["a"]["attempts"], results["b"]["attempts"], results["c"]["attempts"]) == (1, 2, 3)
    assert results["b"]["status"] == "ok" and results["c"]["status"] == "unreachable"
    assert summary["attempts"] == 3 and summary["retryable"] == ["c"]
    retries = [e for e in store.job_events[run.id] if e.get("type") == "retry"]
    assert [e["attempt"] for e in retries] == [2, 3]


def test_facts_are_recorded_only_for_a_real_successful_run(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    store, run = make([online_device("a")])
    monkeypatch.setattr(
        service, "_run_once", FakeAnsible({"a": ["ok"]}, facts={"arch": "aarch64", "privilege": "sudo"})
    )
    run_spec(store, settings, run, SPEC, ["a"], {}, check=True)
    assert "facts" not in store.devices["a"]
    run_spec(store, settings, run, SPEC, ["a"], {})
    assert store.devices["a"]["facts"] == {"arch": "aarch64"} and store.devices["a"]["privilege"] == "sudo"


def test_a_cancelled_job_runs_nothing(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    store, run = make([online_device("a")])
    store.jobs[run.id]["cancel_requested"] = True
    ansible = FakeAnsible({"a": ["ok"]})
    monkeypatch.setattr(service, "_run_once", ansible)
    results, summary, cancelled = run_spec(store, settings, run, SPEC, ["a"], {})
    assert cancelled and ansible.calls == [] and results["a"]["status"] == "cancelled"
    assert summary["ansible_status"] is None and summary["attempts"] == 0


def test_level_steps_report_nothing_and_get_their_own_idents(env, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, make = env
    store, run = make([online_device("a")])
    ansible = FakeAnsible({"a": ["ok"]})
    monkeypatch.setattr(service, "_run_once", ansible)
    monkeypatch.setattr(service.Catalog, "get", lambda self, name: SPEC)
    run_step = step_runner(store, settings)
    assert run_step(run, "demo", ["a"], {}, False)["a"]["status"] == "ok"
    assert run_step(run, "demo", ["a"], {}, False)["a"]["status"] == "ok"
    assert [c["ident"] for c in ansible.calls] == [f"{run.id}-s1-demo", f"{run.id}-s2-demo"]
    assert store.results(run.id) == {}  # the level job reports levels, not playbooks


def test_ansible_ident_is_deterministic() -> None:
    assert ansible_ident("job_1", 1) == "job_1"
    assert ansible_ident("job_1", 2) == "job_1-2"
    assert ansible_ident("job_1", 1, 3, "exporter") == "job_1-s3-exporter"
    assert ansible_ident("job_1", 2, 3, "exporter") == "job_1-2-s3-exporter"
    assert ansible_ident("job_1", 2, 3, "exporter") == ansible_ident("job_1", 2, 3, "exporter")


def test_summary_counts_and_drift() -> None:
    results: dict[str, JSON] = {
        "a": {"status": "ok", "changed": True, "drift": [{"task": "T1"}]},
        "b": {"status": "failed"},
        "c": {"status": "unreachable"},
    }
    outcome = RunOutcome("failed", 2, {}, 7, 1.0)
    summary = service._summary(SPEC, True, results, outcome, 2, 1.23456)
    assert summary["hosts"] == {
        "ok": 1, "failed": 1, "unreachable": 1, "refused": 0, "cancelled": 0, "total": 3, "changed": 1,
    }  # fmt: skip
    assert summary["retryable"] == ["b", "c"] and summary["drift"] == {"a": ["T1"]}
    assert (summary["ansible_status"], summary["ansible_rc"], summary["events"]) == ("failed", 2, 7)
    assert summary["duration_s"] == 1.235
    assert "drift" not in service._summary(SPEC, False, results, None, 0, 0.0)


def test_validation_of_a_retry_skips_its_sealed_secrets() -> None:
    spec = PlaybookSpec("demo", SPEC.path, "", schema={**SPEC.schema, "required": ["password"]})  # a required secret
    assert service._validate(spec, {"password": "x"}, [])["password"] == "x"
    kept = service._validate(spec, {"password": MASK}, ["password"])
    assert "password" not in kept and kept["size"] == 1


def test_a_long_temp_dir_does_not_break_ssh_control_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a $TMPDIR too long for ssh's ControlPath sockets, a job's directory goes to /tmp."""
    import tempfile

    from evc.provisioning.inventory import control_path_fits, job_inventory

    key = tmp_path / "key"
    key.write_text("k")
    long_tmp = tmp_path / ("t" * 60)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with job_inventory([], key, "job_0123456789abcdef") as inv:
        assert control_path_fits(inv.root) and not str(inv.root).startswith(str(long_tmp))
        root = inv.root
    assert not root.exists()
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    with job_inventory([], key, "job_0123456789abcdef") as inv:
        assert str(inv.root).startswith("/tmp/") and control_path_fits(inv.root)
