"""FL jobs end to end: the API, a real Celery worker, simulated devices over SSH, a real Redis.

The devices are root-privilege simulated devices (they run commands as this user), so the
venv's Python (which has numpy) is their ``python``. A shared fleet of 10 gets the FL client and
the FEDERATED.md IID shards once; each test registers it afresh. Reference accuracies and
weights come from the in-process run (:func:`evc.fl.simulation.simulate`) on the same shards.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from evc import pool as pooling
from evc.fl import channels
from evc.fl.checkpoint import latest_round, load_checkpoint
from evc.fl.data import load_reference_digits, partition_iid, save_shard
from evc.fl.models import load_model
from evc.fl.orchestrator import FLSpec, Rounds, checkpoint_dir, eligibility, evaluation_dir
from evc.fl.service import build_spec, shard_bytes
from evc.fl.simulation import simulate
from evc.fl.strategy import make_strategy
from evc.jobs import new_job
from evc.model import Device, Job
from evc.provisioning.catalog import builtin_dir, load_spec
from evc.settings import Settings
from evc.store import JSON, Store, new_id
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.helpers import present, wait_until
from tests.fixtures.services import Worker
from tests.fixtures.sim import run_ansible

pytestmark = pytest.mark.integration

PYTHON = sys.executable
DATA = "~/.evc/fl/data/digits-iid/shard.npz"
#: FEDERATED.md, IID, test accuracy after round 5
REFERENCE_IID_ROUND_5 = 0.8556

#: a softmax model (the very same maths) whose round-2 fit sleeps, to act "mid-round"
#: (SLEEP_S: seconds by client index, and a default)
SLOW_MODEL = """
import time
from evc.device.fl_client import SoftmaxRegression
_m = SoftmaxRegression(64, 10)
def init_params(seed):
    return _m.init_params(seed)
def fit(params, X, y, *, epochs, lr, batch_size, batch_order_seed, prox_mu=0.0, global_params=None):
    if batch_order_seed is not None and batch_order_seed[1] == 2:  # [seed, round, client index]
        time.sleep(SLEEP_S.get(batch_order_seed[2], SLEEP_S["default"]))
    return _m.fit(params, X, y, epochs=epochs, lr=lr, batch_size=batch_size,
                  batch_order_seed=batch_order_seed, prox_mu=prox_mu, global_params=global_params)
def evaluate(params, X, y):
    return _m.evaluate(params, X, y)
"""


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits() -> Any:
    ds = load_reference_digits()
    return ds, partition_iid(len(ds.y_train), 10, 42)


@pytest.fixture(scope="module")
def fleet(simulator: SimulatorThread, settings: Settings, evc_key_path: Path, digits: Any) -> Iterator[list[SimDevice]]:
    """10 root devices with the FL client installed and shard k of the IID split on device k."""
    devices = simulator.start(10, f"fl{os.getpid() % 10000}", privileges="root")
    ds, parts = digits
    recs = [_record(d, f"prep-{d.name}") for d in devices]

    async def prepare() -> None:
        import asyncio

        await asyncio.gather(*(channels.install_client(settings, r, PYTHON) for r in recs))
        await asyncio.gather(*(
            channels.push(settings, r, DATA, shard_bytes(ds.X_train[idx], ds.y_train[idx]))
            for r, idx in zip(recs, parts, strict=True)
        ))  # fmt: skip

    pooling.call(prepare(), 120)
    save_shard(evaluation_dir(settings) / "digits-iid.npz", ds.X_test, ds.y_test)  # as `partition` keeps it
    yield devices
    for d in devices:
        simulator.remove(d.name)


def _record(d: SimDevice, dev_id: str | None = None, **extra: Any) -> Device:
    return cast(Device, {  # the fields registration and install set that FL reads
        "id": dev_id or new_id("dev"), "name": d.name, "host": d.host, "port": d.port,
        "username": d.username, "host_key": d.host_key_public, "state": "online",
        "privilege": "root", "level": 0, "labels": {}, "cluster_id": None, "health": None,
        "created_at": time.time(), **extra,
    })  # fmt: skip


Register = Callable[..., list[Device]]


@pytest.fixture()
def register(store: Store, fleet: list[SimDevice]) -> Iterator[Register]:
    """Device records for the first *n* fleet devices, as registration and install leave them."""
    made: list[str] = []

    def make(n: int = 10, installed: bool = True) -> list[Device]:
        out = []
        for d in fleet[:n]:
            rec = _record(d, fl_client={"python": PYTHON} if installed else None)
            out.append(store.create_device(rec, token_hash="h-" + rec["id"]))
            made.append(rec["id"])
        return out

    yield make
    for dev_id in made:
        if store.get_devices([dev_id]):  # a test may have unregistered them itself
            store.delete_device(dev_id)


@pytest.fixture
def device_readable() -> Iterator[Path]:
    """A directory the simulated devices can read: pytest's own temporary tree is private to
    the host's root (0700), and a simulated root device is an unprivileged host uid."""
    directory = Path(tempfile.mkdtemp(prefix="evc-fl-model-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def slow_model() -> Iterator[Callable[..., str]]:
    """``slow_model(default_s, {client_index: s})`` -> a ``module:`` model spec (in a directory
    the simulated devices can read)."""
    directory = Path(tempfile.mkdtemp(prefix="evc-fl-model-"))
    directory.chmod(0o755)

    def make(default_s: float, by_index: dict[int, float] | None = None) -> str:
        sleeps: dict[Any, float] = {"default": default_s, **(by_index or {})}
        path = directory / f"slow_{abs(hash(repr(sorted(sleeps.items(), key=str))))}.py"
        path.write_text(f"SLEEP_S = {sleeps!r}\n" + SLOW_MODEL)
        path.chmod(0o644)
        return f"module:{path}"

    try:
        yield make
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _job_body(devices: list[Device], rounds: int, **extra: Any) -> JSON:
    return {
        "devices": [d["id"] for d in devices], "data": {"path": DATA}, "rounds": rounds,
        "seed": 42, "lr": 0.1, "batch_size": 32, "local_epochs": 1, "python": PYTHON,
        "test_set": "digits-iid", "round_timeout": 30, **extra,
    }  # fmt: skip


def _reference(digits: Any, n: int, rounds: int) -> Any:
    ds, parts = digits
    return simulate(
        make_strategy("fedavg", seed=42), load_model("softmax"),
        [(ds.X_train[i], ds.y_train[i]) for i in parts[:n]],
        rounds=rounds, test=(ds.X_test, ds.y_test),
    )  # fmt: skip


def _wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    return wait_until(predicate, timeout, what, interval=0.02)


def _fit_in_flight(store: Store, job_id: str, round: int) -> bool:
    """Round *round* is training and its devices' training tasks hold their leases."""
    st = store.fl_state(job_id) or {}
    if st.get("round") != round or st.get("phase") != "training":
        return False
    held = [d for d in st["selected"] if store.lock_owner(f"fl:{job_id}:{st['token']}:{d}")]
    return len(held) == len(st["selected"])


def _final_params(settings: Settings, job_id: str) -> list[np.ndarray]:
    directory = checkpoint_dir(settings)
    return load_checkpoint(directory, job_id, latest_round(directory, job_id)).params


# ---------------------------------------------------------------------- unit checks, no broker
def test_spec_validation_and_paths(settings: Settings) -> None:
    spec = build_spec(settings, {"data": {"path": "~/d/{job}/{name}-{index}.npz"}, "rounds": 3,
                                 "strategy": "fedprox", "strategy_params": {"mu": 0.1}, "seed": 7},
                      ["a", "b"])  # fmt: skip
    assert spec.strategy_params["mu"] == 0.1 and spec.strategy_params["seed"] == 7
    assert FLSpec.from_params(spec.to_params()) == spec
    assert spec.data_path("j1", {"id": "b", "name": "pi"}) == "~/d/j1/pi-1.npz"
    assert channels.client_command("python3", "~/d/x y.npz") == (
        """exec python3 "$HOME"/.evc/fl/client.py --data "$HOME"/'d/x y.npz'"""
    )
    from evc.errors import ValidationError

    bad: JSON
    for bad in (
        {"data": {"path": "~/{oops}.npz"}},
        {"data": {"path": "x"}, "min_available_clients": 3},
        {"data": {"path": "x"}, "python": "python3; rm -rf ~"},
        {"data": {}},
        {"data": {"path": "x"}, "strategy": "fedsgd"},
        {"data": {"path": "x"}, "round_timeout": 10**6},
    ):
        with pytest.raises(ValidationError):
            build_spec(settings, bad, ["a", "b"])
    assert eligibility({"state": "online", "level": 4}) is None
    assert eligibility({"state": "online", "fl_client": {"python": "python3"}}) is None
    assert "not installed" in str(eligibility({"state": "online", "level": 3}))
    assert eligibility({"state": "degraded", "level": 4}) == "the device is degraded"


# ---------------------------------------------------------------------- engine, no broker
class _Recorder:
    """A Dispatcher that only records what the engine asks of the task queue."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def fit_round(self, job_id: str, token: str, device_ids: Any, queue: str) -> None:
        self.calls.append(("fit_round", token, list(device_ids)))

    def close_round(self, job_id: str, token: str, queue: str) -> None:
        self.calls.append(("close_round", token))

    def start_round(self, job_id: str, round: int, queue: str, countdown: float) -> None:
        self.calls.append(("start_round", round))

    def recover(self, job_id: str | None, countdown: float, queue: str = "fl") -> None:
        self.calls.append(("recover", job_id))


def _fl_job(store: Store, settings: Settings, n: int, **extra: Any) -> tuple[Job, list[str]]:
    """An FL job record on *n* device records (no devices behind them: nothing is trained)."""
    ids = []
    for _ in range(n):
        rec = cast(Device, {"id": new_id("dev"), "name": new_id("d"), "host": "127.0.0.1", "port": 1,
                            "username": "u", "state": "online", "level": 4, "created_at": time.time()})  # fmt: skip
        ids.append(store.create_device(rec, token_hash="h-" + rec["id"])["id"])
    spec = build_spec(settings, {"data": {"path": DATA}, "rounds": 2, "seed": 42, **extra}, ids)
    job, _ = store.create_job(new_job("fl", params=spec.to_params(), targets=ids))
    return job, ids


def test_selection_gates_waiting_and_recovery_without_a_broker(store: Store, settings: Settings) -> None:
    job, ids = _fl_job(store, settings, 3, min_available_clients=2, round_timeout=30)
    store.update_device(ids[0], state="degraded")
    store.update_device(ids[1], state="offline")
    store.update_device(ids[2], state="offline")
    rec = _Recorder()
    rounds = Rounds(store, settings, rec)
    assert rounds.start(job["id"]) == "waiting"  # only the degraded device can train, the job needs two
    assert rec.calls == [("start_round", 1)] and present(store.fl_state(job["id"]))["phase"] == "waiting"

    store.update_device(ids[1], state="online")  # one comes back: the degraded one makes up the number
    store.update_device(ids[2], state="offline")
    assert rounds.start_round(job["id"], 1) == "started"
    assert present(store.fl_state(job["id"]))["selected"] == ids[:2]
    first = ids
    job, ids = _fl_job(store, settings, 3, min_available_clients=2, round_timeout=30)
    store.update_device(ids[0], state="degraded")
    assert rounds.start(job["id"]) == "started"  # two healthy devices: the degraded one sits out
    assert rounds.start_round(job["id"], 1) == "not due"  # a duplicate start is a no-op
    st = present(store.fl_state(job["id"]))
    assert st["selected"] == ids[1:] and st["skipped"] == {ids[0]: "the device is degraded"}
    assert rec.calls[-1] == ("fit_round", st["token"], ids[1:])
    assert rounds.close(job["id"], present(st["token"])) == "waiting"  # nobody reported, deadline ahead
    assert rounds.fit(job["id"], "1-stale", ids[1])["status"] == "stale"

    # the round's tasks are gone (no outcome, no lease): recovery dispatches it again, later deadline
    assert rounds.recover(job["id"]) == {job["id"]: "redispatched"}
    st2 = present(store.fl_state(job["id"]))
    assert rec.calls[-1] == ("fit_round", st["token"], ids[1:]) and st2["dispatches"] == 2
    assert st2["deadline"] >= st["deadline"]

    # devices that never come back: the round fails after round_timeout, with the reason
    job2, ids2 = _fl_job(store, settings, 2, min_available_clients=2, round_timeout=1)
    store.update_device(ids2[0], state="offline")
    assert rounds.start(job2["id"]) == "waiting"
    store.fl_cas(job2["id"], {}, waiting_since=time.time() - 5)
    assert rounds.start_round(job2["id"], 1) == "failed"
    failed = store.get_job(job2["id"])
    assert failed["state"] == "failed" and "needs at least 2 available" in present(failed["error"])["message"]
    assert present(failed["error"])["details"]["unavailable"] == {ids2[0]: "the device is offline"}
    assert job2["id"] not in store.fl_active_jobs()
    for d in first + ids + ids2:
        store.delete_device(d)


# ---------------------------------------------------------------------- end to end
def test_fl_job_end_to_end_matches_the_reference(api: Any, worker: Any, store: Store, settings: Settings,
                                                 register: Register, digits: Any) -> None:  # fmt: skip
    devices = register(10, installed=False)
    ids = [d["id"] for d in devices]
    status, out = api.call("POST", "/api/v1/fl/jobs", json=_job_body(devices, 5))
    assert status == 409 and "not ready" in out["message"]  # no FL client yet: refused, with why

    status, job = api.call("POST", "/api/v1/fl/install", json={"devices": ids, "python": PYTHON})
    assert status == 202, job
    job = api.wait_job(job["id"], 60)
    assert job["state"] == "succeeded", job
    assert present(store.get_device(ids[0])["fl_client"])["numpy"] == np.__version__
    status, job = api.call("POST", "/api/v1/fl/partition", json={"devices": ids, "name": "digits-iid"})
    assert status == 202, job
    job = api.wait_job(job["id"], 60)
    assert job["state"] == "succeeded" and job["results"][ids[3]]["num_examples"] == 144, job

    status, job = api.call("POST", "/api/v1/fl/jobs", json=_job_body(devices, 5))
    assert status == 202 and job["kind"] == "fl", job
    job = api.wait_job(job["id"], 60)
    assert job["state"] == "succeeded", job
    status, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
    rounds = view["fl"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r["num_clients"] == 10 and not r["failures"] and r["duration_s"] > 0 for r in rounds)
    assert abs(rounds[-1]["eval_accuracy"] - REFERENCE_IID_ROUND_5) <= 0.005
    ref = _reference(digits, 10, 5)
    for got, want in zip(rounds, ref.history, strict=True):
        assert got["eval_accuracy"] == pytest.approx(want["eval_accuracy"], abs=1e-12)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-9)
    for a, b in zip(_final_params(settings, job["id"]), ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    # one client process per (job, device, worker process), never one per round
    assert sum(r["client_starts"] for r in rounds) <= 10 * worker.concurrency
    assert view["summary"]["accuracy"] == rounds[-1]["eval_accuracy"]

    status, _ = api.call("GET", f"/api/v1/fl/jobs/{job['id']}/model?round=99")
    assert status == 404
    resp = api.client.get(f"/api/v1/fl/jobs/{job['id']}/model?round=3",
                          headers={"Authorization": f"Bearer {api.reader}"})  # fmt: skip
    assert resp.status_code == 200 and resp.headers["X-EVC-Round"] == "3"
    with np.load(io.BytesIO(resp.data)) as z:
        got = [z[f"arr_{i}"] for i in range(len(z.files))]
    want = load_checkpoint(checkpoint_dir(settings), job["id"], 3).params
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_partial_failure_is_data(api: Any, worker: Any, store: Store, register: Register,
                                 simulator: SimulatorThread, fleet: list[SimDevice],
                                 slow_model: Callable[..., str]) -> None:  # fmt: skip
    """Round 2: device 1 dies mid-fit and device 0 outlives the round's deadline; the round
    closes at round_timeout with the other two, both failures recorded, device 0's late update
    discarded and recorded; round 3 goes on."""
    devices = register(4)
    body = _job_body(devices, 3, model=slow_model(1.0, {0: 5.0}), round_timeout=3.5)
    status, job = api.call("POST", "/api/v1/fl/jobs", json=body)
    assert status == 202, job
    _wait_for(lambda: _fit_in_flight(store, job["id"], 2), what="round 2 in flight")
    simulator.set_fault(fleet[1].name, "down")  # connections cut, the client killed mid-fit
    try:
        _wait_for(lambda: (store.fl_state(job["id"]) or {}).get("round") == 3, what="round 3")
    finally:
        simulator.set_fault(fleet[1].name, "ok")
    job = api.wait_job(job["id"], 60)
    assert job["state"] == "succeeded", job
    d0, d1 = devices[0]["id"], devices[1]["id"]
    view = _wait_for(lambda: (v := api.call("GET", f"/api/v1/fl/jobs/{job['id']}")[1])["fl"]["rounds"][1]["late"]
                     and v, 60, "the late update")  # fmt: skip
    r1, r2, r3 = view["fl"]["rounds"]
    assert r1["num_clients"] == 4 and not r1["failures"]
    assert r2["num_clients"] == 2 and sorted(r2["participants"]) == sorted(d["id"] for d in devices[2:])
    assert set(r2["failures"]) == {d0, d1}
    assert r2["failures"][d1].split(":")[0] in ("connection_dropped", "unreachable")
    assert r2["failures"][d0].startswith("timeout")
    assert r2["duration_s"] >= 3.0  # closed at the deadline, not before
    assert [x["device"] for x in r2["late"]] == [d0]
    # round 3: device 0's channel is in step again; device 1 is back, unless the SSH pool of the
    # process that picked its task still backs off after the failed reconnects (it then sits out)
    assert {d0, *(d["id"] for d in devices[2:])} <= set(r3["participants"]), r3
    assert d1 in r3["participants"] or r3["failures"][d1].startswith("unreachable"), r3


def _fl_worker(settings: Settings, queue: str, log: Path, name: str) -> Worker:
    """A `celery worker` process of its own, on one queue (to kill -9 in the middle of a round)."""
    return Worker(settings, log, concurrency=8, queues=queue, pool="threads").start(name, timeout=40.0)


def test_worker_killed_mid_round_resumes_without_double_counting(
    api: Any, worker: Any, store: Store, settings: Settings, register: Register, digits: Any,
    slow_model: Callable[..., str], tmp_path: Path,
) -> None:  # fmt: skip
    queue = f"fl-kill{os.getpid()}"
    devices = register(4)
    first = _fl_worker(settings, queue, tmp_path / "w2.log", "flkill")
    second = None
    try:
        status, job = api.call(
            "POST", "/api/v1/fl/jobs", json=_job_body(devices, 3, model=slow_model(1.0), queue=queue)
        )
        assert status == 202, job
        _wait_for(lambda: _fit_in_flight(store, job["id"], 2), what="round 2 in flight")
        first.stop(signal.SIGKILL)  # the worker and its children die with four trainings under way
        assert (store.fl_state(job["id"]) or {})["phase"] == "training"
        second = _fl_worker(settings, queue, tmp_path / "w3.log", "flresume")
        job = api.wait_job(job["id"], 60)  # the new worker's start-up recovery resumes round 2
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop(signal.SIGTERM)
    assert job["state"] == "succeeded", job
    _, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
    rounds = view["fl"]["rounds"]
    assert [r["num_clients"] for r in rounds] == [4, 4, 4] and not any(r["failures"] for r in rounds)
    assert rounds[1]["dispatches"] == 2 and rounds[0]["dispatches"] == 1
    ref = _reference(digits, 4, 3)
    for a, b in zip(_final_params(settings, job["id"]), ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)  # every update counted exactly once


def test_stop_and_resume_from_the_checkpoint(api: Any, worker: Any, store: Store, settings: Settings,
                                             register: Register, digits: Any,
                                             slow_model: Callable[..., str]) -> None:  # fmt: skip
    devices = register(4)
    status, job = api.call("POST", "/api/v1/fl/jobs", json=_job_body(devices, 4, model=slow_model(1.5)))
    assert status == 202, job
    _wait_for(lambda: _fit_in_flight(store, job["id"], 2), what="round 2 in flight")
    status, out = api.call("POST", f"/api/v1/fl/jobs/{job['id']}/stop")
    assert status == 202, out
    stopped = api.wait_job(job["id"], 30)
    assert stopped["state"] == "cancelled", stopped
    assert latest_round(checkpoint_dir(settings), job["id"]) == 1  # round 2 was cut short: discarded
    assert present(store.fl_state(job["id"]))["phase"] == "stopped"
    status, out = api.call("POST", f"/api/v1/fl/jobs/{job['id']}/resume")
    assert status == 202 and out["attempt"] == 1, out
    status, out = api.call("POST", f"/api/v1/fl/jobs/{job['id']}/resume")
    assert status in (202, 409)  # running (recovery, a no-op) or still queued
    done = api.wait_job(job["id"], 60)
    assert done["state"] == "succeeded", done
    _, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
    assert [r["round"] for r in view["fl"]["rounds"]] == [1, 2, 3, 4]
    ref = _reference(digits, 4, 4)
    for a, b in zip(_final_params(settings, job["id"]), ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    status, out = api.call("POST", f"/api/v1/fl/jobs/{job['id']}/resume")
    assert status == 409  # a finished job does not resume


@pytest.mark.slow
def test_fl_client_playbook_installs_and_checks(sim_devices: Any, evc_key_path: Path, tmp_path: Path) -> None:
    """The catalog's fl-client playbook (function level L4): ships the client, checks the Python
    has numpy, changes nothing the second time, and refuses a Python without numpy."""
    spec = load_spec(builtin_dir() / "fl-client.yml", "builtin")
    assert spec.min_privilege == "user" and spec.validate({}) == {"python": "python3", "plugin": ""}
    (dev,) = sim_devices(1, privilege="root")
    argv = ["ansible-playbook", str(spec.path), "-e", f"python={PYTHON}"]
    first = run_ansible(argv, [("d", dev)], evc_key_path, tmp_path / "a1")
    assert first.returncode == 0 and "changed=3" in first.stdout, first.stdout[-2000:]  # directory, models, client
    assert (dev.home / ".evc" / "fl" / "client.py").read_bytes() == channels.CLIENT_PATH.read_bytes()
    # again, with a Python that cannot run it: nothing changes, and the check refuses, saying why
    bad = run_ansible(["ansible-playbook", str(spec.path), "-e", "python=/bin/false"], [("d", dev)],
                      evc_key_path, tmp_path / "a2")  # fmt: skip
    assert bad.returncode != 0 and "changed=0" in bad.stdout and "failed=1" in bad.stdout, bad.stdout[-2000:]
    assert "cannot run the FL client" in bad.stdout


#: a user model that records every process importing it (then trains like softmax)
PLANTED_MODEL = """
import os, sys
with open(MARKER, "a") as fh:
    fh.write(os.path.basename(sys.argv[0] if sys.argv else "?") + "\\n")
from evc.device.fl_client import SoftmaxRegression
_m = SoftmaxRegression(64, 10)
init_params, fit, evaluate = _m.init_params, _m.fit, _m.evaluate
"""


def test_planted_module_never_runs_on_the_controller(api: Any, worker: Any, store: Store, register: Register,
                                                     digits: Any, device_readable: Path) -> None:  # fmt: skip
    """Issue 10.3: a ``module:`` model is device code. Through the API and a real worker the
    controller never imports it: round 0's parameters come from a device (get_parameters),
    server-side evaluation is skipped, and only the device clients (client.py) ran it."""
    marker = device_readable / "imported-by.txt"
    marker.touch()
    marker.chmod(0o666)  # every importer may note itself, the devices' accounts included
    module = device_readable / "planted.py"
    module.write_text(f"MARKER = {str(marker)!r}\n" + PLANTED_MODEL)
    module.chmod(0o644)
    devices = register(3)
    status, job = api.call("POST", "/api/v1/fl/jobs", json=_job_body(devices, 2, model=f"module:{module}"))
    assert status == 202, job
    job = api.wait_job(job["id"], 60)
    assert job["state"] == "succeeded", job
    importers = marker.read_text().split()
    assert importers and set(importers) == {"client.py"}, importers  # devices only, never API/worker
    _, events = api.call("GET", f"/api/v1/jobs/{job['id']}/events")
    assert any("initial parameters" in e.get("message", "") for e in events["items"]), events
    _, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
    assert [r["num_clients"] for r in view["fl"]["rounds"]] == [3, 3]
    assert view["fl"]["rounds"][-1]["eval_accuracy"] is None  # not evaluated by running it here
    ref = _reference(digits, 3, 2)  # the same maths: the device-given init is softmax's zeros
    for a, b in zip(_final_params(api.settings, job["id"]), ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_two_registrations_of_one_fleet_train_the_same_clients(api: Any, worker: Any, store: Store,
                                                              register: Register) -> None:  # fmt: skip
    """Issue 16.1: one fleet registered twice (new device ids each time), the same shards,
    device order and seed: the same client sets (by position in the job) and the same accuracy."""
    seen = []
    for _ in range(2):
        devices = register(6)
        index = {d["id"]: k for k, d in enumerate(devices)}
        status, job = api.call("POST", "/api/v1/fl/jobs", json=_job_body(devices, 3, fraction_fit=0.5))
        assert status == 202, job
        job = api.wait_job(job["id"], 60)
        assert job["state"] == "succeeded", job
        _, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
        seen.append([(sorted(index[d] for d in r["participants"]), r["eval_accuracy"]) for r in view["fl"]["rounds"]])
        for d in devices:  # unregister: the same simulated devices register again, under new ids
            store.delete_device(d["id"])
    assert seen[0] == seen[1], seen
    assert all(len(clients) == 3 for clients, _ in seen[0])


#: a softmax model whose round-1 fit kills its own client process with SIGKILL on client 0 (what
#: the kernel's OOM killer does) and takes a second on the others
KILLED_MODEL = """
import os, signal, time
from evc.device.fl_client import SoftmaxRegression
_m = SoftmaxRegression(64, 10)
init_params, evaluate = _m.init_params, _m.evaluate
def fit(params, X, y, *, epochs, lr, batch_size, batch_order_seed, prox_mu=0.0, global_params=None):
    if batch_order_seed[1] == 1 and batch_order_seed[2] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if batch_order_seed[1] == 1:
        time.sleep(1.0)
    return _m.fit(params, X, y, epochs=epochs, lr=lr, batch_size=batch_size,
                  batch_order_seed=batch_order_seed, prox_mu=prox_mu, global_params=global_params)
"""


def test_failures_say_what_happened(api: Any, worker: Any, store: Store, register: Register,
                                    device_readable: Path) -> None:  # fmt: skip
    """Issue 16.2 on real simulated devices: a client killed by SIGKILL is reported as such; a
    degraded device sitting round 1 out is named with its health checks' reason; when no device
    can train round 2 the job fails at once (not after round_timeout) with every device's reason."""
    module = device_readable / "killed.py"
    module.write_text(KILLED_MODEL)
    module.chmod(0o644)
    devices = register(4)
    ids = [d["id"] for d in devices]
    sick = {"breaches": ["load1 9.00 per CPU > 2.00"], "misses": 0}
    store.update_device(ids[3], state="degraded", health=sick)
    body = _job_body(devices, 2, model=f"module:{module}", round_timeout=30)
    status, job = api.call("POST", "/api/v1/fl/jobs", json=body)
    assert status == 202, job
    _wait_for(lambda: _fit_in_flight(store, job["id"], 1), what="round 1 in flight")
    lost = {"misses": 3, "error": {"reason": "unreachable", "message": "connection refused"}}
    for dev_id in ids:
        store.update_device(dev_id, state="offline", health=lost)
    job = api.wait_job(job["id"], 20)  # round 1 closes (~1 s); round 2 cannot start: failed at once
    assert job["state"] == "failed", job
    _, view = api.call("GET", f"/api/v1/fl/jobs/{job['id']}")
    (r1,) = view["fl"]["rounds"]
    assert r1["failures"][ids[0]] == "command_failed: the FL client was killed by SIGKILL — out of memory?", r1
    assert sorted(r1["participants"]) == sorted(ids[1:3])
    assert r1["skipped"] == {ids[3]: "the device is degraded (load1 9.00 per CPU > 2.00)"}
    error = present(job["error"])
    assert error["message"].startswith("no device can train round 2: "), error
    why = "the device is offline (3 missed health checks (unreachable: connection refused))"
    assert error["details"]["unavailable"] == dict.fromkeys(ids, why)
    assert present(job["finished_at"]) - r1["closed_at"] < 5.0  # not round_timeout (30 s) later
