"""Provisioning end to end: real ansible-playbook through ansible-runner, simulated devices at
each privilege level and a real OpenSSH sshd, Redis, and a real Celery worker."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pwd
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from unittest import mock

import pytest

from evc.context import Caller, Context
from evc.errors import Conflict, PreconditionFailed, ValidationError
from evc.jobs import JobRun
from evc.model import Device, Job
from evc.provisioning.locks import device_lock
from evc.provisioning.service import ProvisionRequest, provision, retry_job, submit_provision
from evc.settings import Settings
from evc.store import JSON, Store, new_id, now
from evc_sim import SimDevice
from evc_sim.namespaces import UID_BASE
from tests.fixtures.helpers import present, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("flush")]


class NoBroker:
    """A sender for jobs the test runs itself: records what would have been enqueued."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        self.sent.append((name, args))


def register(store: Store, dev: Any, **changes: Any) -> Device:
    """A device record as registration leaves it, for a simulated device or the test sshd."""
    rec: JSON = {
        "id": new_id("dev"),
        "name": f"{getattr(dev, 'name', 'sshd')}-{secrets.token_hex(3)}",
        "host": dev.host, "port": dev.port, "username": dev.username,
        "labels": {"site": "lab"}, "jump_host": None, "state": "online",
        "host_key": dev.host_key_public, "privilege": getattr(dev, "privilege", "root"),
        "facts": {}, "cluster_id": None, "level": 0, "created_at": now(),
    }  # fmt: skip
    rec.update(changes)
    return store.create_device(cast(Device, rec), token_hash=f"x-{rec['id']}")


def run_job(store: Store, settings: Settings, job: Job, **kw: Any) -> tuple[Job, JSON]:
    """Run a stored provision job in this process, ending it as the Celery wrapper does."""
    run = JobRun.start(store, job["id"])
    assert run is not None
    summary = provision(store, settings, run, **kw)
    if run.cancelled():
        run.cancel(summary)
    else:
        run.succeed(summary)
    return store.get_job(job["id"]), store.results(job["id"])


def submit(store: Store, settings: Settings, playbook: str, targets: list[str], **req: Any) -> Job:
    request = ProvisionRequest.from_dict({"playbook": playbook, "targets": targets, **req})
    job, created = submit_provision(Context(store, settings, NoBroker(), Caller("test")), request)
    assert created
    return job


def provision_now(store: Store, settings: Settings, playbook: str, targets: list[str], **req: Any) -> tuple[Job, JSON]:
    internal = req.pop("internal_vars", None)
    job = submit(store, settings, playbook, targets, **req)
    return run_job(store, settings, job, internal_vars=internal)


def all_events(store: Store, job_id: str) -> list[JSON]:
    return store.events(job_id, 0, 100_000)


def wait_for(cond: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    return wait_until(cond, timeout, what, interval=0.1)


@pytest.fixture(scope="module")
def wheelhouse() -> Iterator[Path]:
    """A directory every simulated account can read, holding one tiny wheel: evcdemo 0.1."""
    root = Path(tempfile.mkdtemp(prefix="evc-wheels-"))
    root.chmod(0o755)
    files = {
        "evcdemo/__init__.py": b"VERSION = '0.1'\n",
        "evcdemo-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: evcdemo\nVersion: 0.1\n",
        "evcdemo-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: evc-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("evcdemo-0.1.dist-info/RECORD,,")
    wheel = root / "evcdemo-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("evcdemo-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    wheel.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def artifacts(settings: Settings) -> Path:
    """Operator-supplied stub artifacts: a k3s 'binary' and a containerd release archive."""
    root = settings.data_dir / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    (root / "k3s").write_text("#!/bin/sh\necho 'k3s stub (EVC tests)'\n")
    (root / "k3s").chmod(0o755)
    (root / "k3s-airgap-images-amd64.tar").write_bytes(b"stub images\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("bin/", "bin/containerd", "bin/ctr"):
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = f"#!/bin/sh\necho '{name} stub'\n".encode()
                info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    (root / "containerd-1.7.0-linux-amd64.tar.gz").write_bytes(buf.getvalue())
    return root


def stage_root(base: Path, dev: Device, sim: SimDevice) -> Path:
    """The per-device system root the playbooks write to (``evc_sysroot``/<device id>),
    owned by the device's account so that a sudo stand-in can write there too (a root device's
    root is, on the host, the unprivileged uid its user namespace maps to root)."""
    root = base / dev["id"]
    root.mkdir(parents=True)
    if sim.privilege == "root":
        os.chown(root, UID_BASE, UID_BASE)
    else:
        pw = pwd.getpwnam(sim.username)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    return root


def messages(results: JSON) -> JSON:
    return {d: (r["status"], r.get("message")) for d, r in results.items()}


def ansible_events(events: list[JSON]) -> list[JSON]:
    return [e for e in events if e.get("type") == "ansible" and e.get("event") != "status"]


# ------------------------------------------------------------------------------ tests
def test_devenv_at_each_privilege_level(store, settings, sim_devices, wheelhouse) -> None:
    """Check mode reports drift and changes nothing; a run installs; a second run changes
    nothing; every Ansible event reaches the job, complete and in order."""
    sims = sim_devices(3, privilege=["root", "sudo", "user"])
    devs = [register(store, s) for s in sims]
    ids = [d["id"] for d in devs]
    extra = {
        "packages": ["evcdemo==0.1"], "pip_find_links": str(wheelhouse), "pip_no_index": True,
        "workspace": "work", "venv": "envs/dev",
    }  # fmt: skip

    job, results = provision_now(store, settings, "devenv", ids, extra_vars=extra, check=True)
    assert job["state"] == "succeeded", messages(results)
    for dev_id, sim in zip(ids, sims, strict=True):
        drift = [c["task"] for c in results[dev_id]["drift"]]
        assert {"Workspace directory", "Virtual environment", "Python packages"} <= set(drift)
        assert results[dev_id]["in_sync"] is False
        assert not (sim.home / "work").exists(), "check mode changed the device"
    assert set(job["summary"]["drift"]) == set(ids)

    job, results = provision_now(store, settings, "devenv", ids, extra_vars=extra)
    assert job["state"] == "succeeded", job
    for dev_id, sim in zip(ids, sims, strict=True):
        assert results[dev_id]["status"] == "ok" and results[dev_id]["changed"] >= 3
        py = sim.home / "envs" / "dev" / "bin" / "python"
        out = subprocess.run([str(py), "-c", "import evcdemo; print(evcdemo.VERSION)"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout.strip() == "0.1"
        assert (sim.home / "work").is_dir()
        assert (sim.home / "work").stat().st_uid == pwd.getpwnam(sim.username).pw_uid

    # events: every Ansible event, in order, with host/task/status; status handler's states
    events = all_events(store, job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    ans = ansible_events(events)
    assert [e["counter"] for e in ans] == list(range(1, len(ans) + 1))
    assert len(ans) == job["summary"]["events"]
    assert ans[0]["event"] == "playbook_on_start" and ans[-1]["event"] == "playbook_on_stats"
    statuses = [e["status"] for e in events if e.get("event") == "status"]
    assert statuses == ["starting", "running", "successful"]
    host_events = [e for e in ans if e["event"] == "runner_on_ok"]
    assert {e["host"] for e in host_events} == set(ids)
    assert all(e["task"] and e["status"] in ("ok", "changed") for e in host_events)
    assert ans[-1]["hosts"][ids[0]]["changed"] == results[ids[0]]["changed"]
    assert events[-1]["type"] == "job" and events[-1]["state"] == "succeeded"

    job, results = provision_now(store, settings, "devenv", ids, extra_vars=extra)
    assert job["state"] == "succeeded", job
    assert all(results[d]["changed"] == 0 and results[d]["status"] == "ok" for d in ids), results
    assert job["summary"]["hosts"]["changed"] == 0


def test_system_playbooks_refuse_users_and_install_from_artifacts(
    store, settings, sim_devices, artifacts, request
) -> None:
    """container-runtime and k3s need root or sudo: an unprivileged device is refused up front
    (and alone, the request is refused); the others install from the operator's artifacts,
    idempotently; cleanup removes it all."""
    user_sim, root_sim, sudo_sim = sim_devices(3, privilege=["user", "root", "sudo"])
    user, root, sudo = (register(store, s) for s in (user_sim, root_sim, sudo_sim))
    sysroot = Path(tempfile.mkdtemp(prefix="evc-sysroot-"))  # reachable by every account
    sysroot.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(sysroot, ignore_errors=True))
    stages = {root["id"]: stage_root(sysroot, root, root_sim)}
    stages[sudo["id"]] = stage_root(sysroot, sudo, sudo_sim)
    internal = {"evc_sysroot": str(sysroot)}
    ids = [user["id"], root["id"], sudo["id"]]

    with pytest.raises(PreconditionFailed) as exc:
        submit(store, settings, "k3s-server", [user["id"]], extra_vars={"artifact": "k3s"})
    assert exc.value.details["refused"][user["id"]]["reason"] == "privilege"

    cr = {"source": "artifact", "artifact": "containerd-1.7.0-linux-amd64.tar.gz"}
    for attempt in (1, 2):
        job, results = provision_now(store, settings, "container-runtime", ids, extra_vars=cr, internal_vars=internal)
        assert job["state"] == "failed"  # the refused device makes the job fail...
        assert job["summary"]["hosts"] == {
            "ok": 2, "failed": 0, "unreachable": 0, "refused": 1, "cancelled": 0, "total": 3,
            "changed": 2 if attempt == 1 else 0,
        }, messages(results)  # fmt: skip
        assert results[user["id"]]["status"] == "refused"
        assert results[user["id"]]["reason"] == "privilege"
        assert "root or passwordless sudo" in results[user["id"]]["message"]
        for dev_id in (root["id"], sudo["id"]):
            assert results[dev_id]["status"] == "ok"
            assert (results[dev_id]["changed"] > 0) == (attempt == 1), results[dev_id]
    for stage in stages.values():
        assert (stage / "usr/local/bin/containerd").read_text().startswith("#!/bin/sh")
        assert "ExecStart=/usr/local/bin/containerd" in (stage / "etc/systemd/system/containerd.service").read_text()
        assert (stage / "var/lib/evc/container-runtime.files").read_text().split() == [
            "containerd", "ctr",
        ]  # fmt: skip

    k3s = {"artifact": "k3s", "images": "k3s-airgap-images-amd64.tar", "token": "s3cr3t-token",
           "node_labels": ["evc/role=edge"], "disable": ["traefik"]}  # fmt: skip
    targets = [root["id"], sudo["id"]]
    for attempt in (1, 2):
        job, results = provision_now(store, settings, "k3s-server", targets, extra_vars=k3s, internal_vars=internal)
        assert job["state"] == "succeeded", job
        assert all((results[d]["changed"] > 0) == (attempt == 1) for d in targets), results
        assert job["params"]["extra_vars"]["token"] == "********"  # never stored in the job
        assert "s3cr3t-token" not in str(all_events(store, job["id"]))
    for stage in stages.values():
        cfg = (stage / "etc/rancher/k3s/config.yaml").read_text()
        assert 'token: "s3cr3t-token"' in cfg and 'disable: ["traefik"]' in cfg
        assert (stage / "usr/local/bin/kubectl").readlink() == stage / "usr/local/bin/k3s"
        assert (stage / "var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar").is_file()

    agent = {"artifact": "k3s", "server_url": "https://10.0.0.5:6443", "token": "s3cr3t-token"}
    job, results = provision_now(
        store, settings, "k3s-agent", targets, extra_vars=agent, internal_vars=internal, check=True
    )
    assert job["state"] == "succeeded", messages(results)
    for dev_id in targets:  # the server's files are there: the agent would change its config and unit
        drift = {c["task"] for c in results[dev_id]["drift"]}
        assert {"Configuration", "Service unit"} <= drift, drift  # Configuration is no_log
        assert "K3s binary" not in drift
    assert "s3cr3t-token" not in str(all_events(store, job["id"])) + str(results)
    assert not any((stage / "etc/systemd/system/k3s-agent.service").exists() for stage in stages.values())

    job, results = provision_now(store, settings, "cleanup", targets, internal_vars=internal)
    assert job["state"] == "succeeded", job
    for stage in stages.values():
        left = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir())
        assert left == [], left


def test_custom_playbook_directory(store, settings, sim_devices, tmp_path) -> None:
    book = tmp_path / "books"
    book.mkdir()
    (book / "hello.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Greet\n"
        "      ansible.builtin.lineinfile:\n"
        "        path: '~/hello.txt'\n"
        "        line: '{{ greeting }}'\n"
        "        create: true\n"
        "        mode: '0644'\n"
    )
    (book / "hello.meta.yml").write_text(
        "description: write a greeting to ~/hello.txt\nmin_privilege: user\n"
        "params:\n  type: object\n  additionalProperties: false\n  required: [greeting]\n"
        "  properties:\n    greeting: {type: string, maxLength: 40}\n"
    )
    custom = settings.replace(playbook_dirs=str(book))
    (sim,) = sim_devices(1, privilege="user")
    dev = register(store, sim)
    with pytest.raises(ValidationError):  # the schema applies to operator playbooks too
        submit(store, custom, "hello", [dev["id"]], extra_vars={"greeting": "x" * 41})
    job, results = provision_now(store, custom, "hello", [dev["id"]], extra_vars={"greeting": "hello from EVC"})
    assert job["state"] == "succeeded", job
    assert results[dev["id"]]["changed_tasks"] == ["Greet"], results
    assert (sim.home / "hello.txt").read_text() == "hello from EVC\n"


def test_retry_relaunches_only_failed_hosts(store, settings, simulator, sim_devices) -> None:
    """A device down during the first run is unreachable; the job fails with the others ok;
    retry_job re-runs only that device; the facts playbook records facts and privilege."""
    ok_sim, down_sim = sim_devices(2, privilege="user")
    ok_dev, down_dev = register(store, ok_sim), register(store, down_sim)
    simulator.set_fault(down_sim.name, "down")
    job, results = provision_now(store, settings, "facts", [ok_dev["id"], down_dev["id"]])
    assert job["state"] == "failed" and present(job["error"])["code"] == "provision_failed"
    assert results[ok_dev["id"]]["status"] == "ok"
    assert results[down_dev["id"]]["status"] == "unreachable"
    assert job["summary"]["retryable"] == [down_dev["id"]]
    assert store.get_device(ok_dev["id"])["facts"]["arch"]

    simulator.set_fault(down_sim.name, "ok")
    sender = NoBroker()
    retry, _ = retry_job(Context(store, settings, sender, Caller("test")), job["id"])
    assert retry["targets"] == [down_dev["id"]] and retry["retry_of"] == job["id"]
    assert sender.sent == [("evc.provision", [retry["id"]])]
    retry, results = run_job(store, settings, retry)
    assert retry["state"] == "succeeded", retry
    assert list(results) == [down_dev["id"]] and results[down_dev["id"]]["status"] == "ok"
    after = store.get_device(down_dev["id"])
    assert after["facts"]["arch"] and after["privilege"] == "user"
    with pytest.raises(Conflict):  # nothing left to retry
        retry_job(Context(store, settings, sender), retry["id"])


def test_automatic_retry_policy(store, settings, simulator, sim_devices) -> None:
    (sim,) = sim_devices(1, privilege="user")
    dev = register(store, sim)
    simulator.set_fault(sim.name, "down")
    job = submit(store, settings, "facts", [dev["id"]], retry={"max": 2, "delay_s": 1.0})

    def restore() -> None:
        wait_for(lambda: any(e["type"] == "retry" for e in all_events(store, job["id"])),
                 what="a retry event")  # fmt: skip
        simulator.set_fault(sim.name, "ok")

    t = threading.Thread(target=restore)
    t.start()
    done, results = run_job(store, settings, job)
    t.join()
    assert done["state"] == "succeeded", done
    assert done["summary"]["attempts"] == 2 and results[dev["id"]]["attempts"] == 2


def test_changed_host_key_is_refused(store, settings, sim_devices) -> None:
    a, b = sim_devices(2, privilege="user")
    dev = register(store, a, host_key=b.host_key_public)  # pinned: another device's key
    job, results = provision_now(store, settings, "facts", [dev["id"]])
    assert job["state"] == "failed"
    res = results[dev["id"]]
    assert res["status"] == "unreachable"
    assert "host key" in res["message"].lower() or "identification" in res["message"].lower()


def test_device_locks_wait_or_refuse(store, settings, sim_devices) -> None:
    (sim,) = sim_devices(1, privilege="user")
    dev = register(store, sim)
    name = device_lock(dev["id"])
    assert store.acquire_lock(name, "job_other", 30)
    with pytest.raises(Conflict) as exc:
        submit(store, settings, "facts", [dev["id"]], lock="fail")
    assert exc.value.details["locked"] == {dev["id"]: "job_other"}

    job = submit(store, settings, "facts", [dev["id"]], lock="wait")
    threading.Timer(1.5, lambda: store.release_lock(name, "job_other")).start()
    done, results = run_job(store, settings, job)
    assert done["state"] == "succeeded", done
    assert any("waiting for job job_other" in e["message"] for e in all_events(store, job["id"]))
    assert store.lock_owner(name) is None  # released at the end

    # taken between submit and run: lock "fail" refuses that device in the job's results
    job = submit(store, settings, "facts", [dev["id"]], lock="fail")
    assert store.acquire_lock(name, "job_late", 30)
    done, results = run_job(store, settings, job)
    assert done["state"] == "failed" and results[dev["id"]]["reason"] == "locked"
    store.release_lock(name, "job_late")


def test_cleanup_can_remove_evc_key(store, settings, sim_devices, evc_public_key) -> None:
    (sim,) = sim_devices(1, privilege="user")
    dev = register(store, sim)
    job, _ = provision_now(store, settings, "cleanup", [dev["id"]], extra_vars={"remove_key": True})
    assert job["state"] == "succeeded", job
    assert evc_public_key.split()[1] not in sim.authorized_keys_path.read_text()
    job, results = provision_now(store, settings, "facts", [dev["id"]])
    assert results[dev["id"]]["status"] == "unreachable"


def test_against_real_openssh(store, settings, sshd) -> None:
    """The real sshd (its account is the test runner's): facts, devenv twice, cleanup."""
    dev = register(store, sshd, privilege="user")  # recorded low: facts re-probes it
    tag = f"evc-test-{secrets.token_hex(4)}"
    home = Path(pwd.getpwnam(sshd.username).pw_dir)
    extra = {"workspace": f"{tag}/work", "venv": f"{tag}/venv", "build_tools": False}
    try:
        job, results = provision_now(store, settings, "facts", [dev["id"]])
        assert job["state"] == "succeeded", job
        rec = store.get_device(dev["id"])
        assert rec["facts"]["arch"] and rec["facts"]["python3"]
        assert rec["privilege"] == ("root" if os.geteuid() == 0 else rec["privilege"])
        for attempt in (1, 2):
            job, results = provision_now(store, settings, "devenv", [dev["id"]], extra_vars=extra)
            assert job["state"] == "succeeded", job
            assert (results[dev["id"]]["changed"] > 0) == (attempt == 1), results
        assert (home / tag / "venv" / "bin" / "python").exists()
        job, _ = provision_now(
            store, settings, "cleanup", [dev["id"]],
            extra_vars={"workspace": extra["workspace"], "venv": extra["venv"],
                        "components": ["devenv"], "remove_workspace": True},
        )  # fmt: skip
        assert job["state"] == "succeeded", job
        assert not (home / tag / "venv").exists() and not (home / tag / "work").exists()
    finally:
        shutil.rmtree(home / tag, ignore_errors=True)


# ------------------------------------------------------------------------------ through a worker
@pytest.fixture()
def papi(api):
    """The API test client with the provision blueprint (registered here until the app does)."""
    from evc.api import app as app_module

    if "evc.api.provision" in app_module.BLUEPRINTS:
        return api
    from tests.fixtures.services import API

    with mock.patch.object(app_module, "BLUEPRINTS", [*app_module.BLUEPRINTS, "evc.api.provision"]):
        return API(app_module.create_app(api.settings), api.store, api.settings)


def test_api_and_worker(papi, worker, sim_devices, artifacts) -> None:
    user_sim, root_sim = sim_devices(2, privilege=["user", "root"])
    user, root = register(papi.store, user_sim), register(papi.store, root_sim)

    status, body = papi.call("GET", "/api/v1/playbooks", token="read")
    assert status == 200
    names = {p["name"] for p in body["items"]}
    assert {"facts", "devenv", "container-runtime", "k3s-server", "k3s-agent", "cleanup"} <= names
    assert papi.call("POST", "/api/v1/provision", token="read",
                     json={"playbook": "facts", "targets": [user["id"]]})[0] == 403  # fmt: skip
    for bad, code in [
        ({"playbook": "../facts", "targets": [user["id"]]}, 422),
        ({"playbook": "facts"}, 422),
        ({"playbook": "devenv", "targets": [user["id"]], "extra_vars": {"ansible_user": "x"}}, 422),
        ({"playbook": "facts", "targets": ["dev_nope"]}, 404),
        ({"playbook": "nope", "targets": [user["id"]]}, 404),
        ({"playbook": "k3s-server", "targets": [user["id"]], "extra_vars": {"artifact": "k3s"}}, 409),
    ]:  # fmt: skip
        status, err = papi.call("POST", "/api/v1/provision", json=bad)
        assert status == code, (bad, status, err)

    status, job = papi.call(
        "POST", "/api/v1/provision",
        json={"playbook": "facts", "selector": {"labels": {"site": "lab"}}},
        headers={"Idempotency-Key": "facts-1"},
    )  # fmt: skip
    assert status == 202 and job["kind"] == "provision", job
    assert set(job["targets"]) == {user["id"], root["id"]}
    again = papi.call("POST", "/api/v1/provision", headers={"Idempotency-Key": "facts-1"},
                      json={"playbook": "facts", "selector": {"labels": {"site": "lab"}}})  # fmt: skip
    assert again[1]["id"] == job["id"]
    done = papi.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert {r["status"] for r in done["results"].values()} == {"ok"}
    assert papi.store.get_device(root["id"])["privilege"] == "root"
    status, err = papi.call("POST", f"/api/v1/jobs/{job['id']}/retry")
    assert status == 409 and "no failed or unreachable hosts" in err["message"]


def test_cancel_stops_a_running_playbook(papi, worker, simulator, sim_devices) -> None:
    (sim,) = sim_devices(1, privilege="user")
    dev = register(papi.store, sim)
    simulator.set_fault(sim.name, "slow", slow_s=2.0)  # every command starts 2 s late
    status, job = papi.call("POST", f"/api/v1/devices/{dev['id']}/provision",
                            json={"playbook": "devenv", "extra_vars": {"build_tools": False}})  # fmt: skip
    assert status == 202, job
    store = papi.store
    wait_for(lambda: any(e.get("event") == "runner_on_start" for e in all_events(store, job["id"])),
             what="the playbook to start a task")  # fmt: skip
    t0 = time.monotonic()
    status, _ = papi.call("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert status == 202
    done = papi.wait_job(job["id"], timeout=30)
    assert done["state"] == "cancelled", done
    assert time.monotonic() - t0 < 15
    assert done["results"][dev["id"]]["status"] == "cancelled", done["results"]
    assert any(e.get("status") == "canceled" for e in all_events(store, job["id"]))
    assert store.lock_owner(device_lock(dev["id"])) is None
    simulator.set_fault(sim.name, "ok")


def test_jump_host_through_real_openssh(store, settings, sshd, sim_devices) -> None:
    """A device reached through a jump host (the real sshd) with ProxyJump; the jump host's key
    is pinned too, and a wrong one refuses the connection."""
    (sim,) = sim_devices(1, privilege="user")
    jump = {"host": sshd.host, "port": sshd.port, "username": sshd.username, "host_key": sshd.host_key_public}
    dev = register(store, sim, jump_host=jump)
    job, results = provision_now(store, settings, "facts", [dev["id"]])
    assert job["state"] == "succeeded", messages(results)
    assert "Accepted publickey" in sshd.log_path.read_text()

    other = register(store, sim, jump_host={**jump, "host_key": sim.host_key_public})  # wrong pin
    job, results = provision_now(store, settings, "facts", [other["id"]])
    assert results[other["id"]]["status"] == "unreachable", messages(results)
    # the jump's own ssh refuses it; the result names the jump host and why
    assert results[other["id"]]["reason"] == "jump_host_key_mismatch", messages(results)
    assert f"jump host {sshd.username}@{sshd.host}:{sshd.port} changed" in results[other["id"]]["message"]
