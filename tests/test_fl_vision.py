"""Vision in FL (issue 16.4) through the full stack: devices registered through the API, the
`fl-client` playbook shipping the client and a user plug-in (Flower's NumPyClient shape), FL
jobs on a real worker training the built-in CNN and the plug-in on simulated devices."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.fl.checkpoint import latest_round, load_checkpoint
from evc.fl.data import load_reference_digits, partition_iid
from evc.fl.models import load_model
from evc.fl.orchestrator import checkpoint_dir
from evc.fl.simulation import simulate
from evc.fl.strategy import make_strategy
from evc.store import Store
from evc_sim import SimDevice, SimulatorThread
from tests.fixtures.cli import evc
from tests.fixtures.deploy import started_devices
from tests.fixtures.fleet import register_devices
from tests.fixtures.helpers import free_port

pytestmark = pytest.mark.integration

PYTHON = sys.executable
DATA = "~/.evc/fl/data/digits-vision/shard.npz"

#: a plug-in in Flower's NumPyClient shape: softmax regression written out with numpy, noting
#: every process that imports it (the devices' clients only, never the controller)
PLUGIN = """
import os, sys
import numpy as np

with open(MARKER, "a") as fh:
    fh.write(os.path.basename(sys.argv[0] if sys.argv else "?") + "\\n")


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxTrainer:
    def __init__(self, X, y):
        self.X, self.y = X, y

    def get_parameters(self, config):
        return [np.zeros((64, 10)), np.zeros(10)]

    def fit(self, parameters, config):
        W, b = (np.array(p, dtype=np.float64) for p in parameters)
        rng = np.random.default_rng(config["batch_order_seed"])
        for _ in range(config["epochs"]):
            order = rng.permutation(len(self.y))
            for start in range(0, len(order), config["batch_size"]):
                i = order[start:start + config["batch_size"]]
                p = _softmax(self.X[i] @ W + b)
                p[np.arange(len(i)), self.y[i]] -= 1.0
                p /= len(i)
                W -= config["lr"] * (self.X[i].T @ p)
                b -= config["lr"] * p.sum(axis=0)
        return [W, b], len(self.y), {"loss": 0.0}

    def evaluate(self, parameters, config):
        p = _softmax(self.X @ parameters[0] + parameters[1])
        loss = float(-np.mean(np.log(p[np.arange(len(self.y)), self.y])))
        return loss, len(self.y), {"accuracy": float(np.mean(p.argmax(axis=1) == self.y))}


def client_fn(X, y):
    return SoftmaxTrainer(X, y)
"""


@pytest.fixture(scope="module")
def readable() -> Iterator[Path]:
    """A directory the simulated devices' accounts can read and write in (pytest's own is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="evc-fl-vision-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def vision_fleet(api: Any, worker: Any, store: Store, simulator: SimulatorThread, readable: Path) -> Iterator[Any]:
    """Three root devices registered through the API, the FL client and the plug-in shipped by
    the fl-client playbook, and shard k of the digits IID split on device k (edge servers a
    test left running are stopped afterwards)."""
    with started_devices(simulator, 3, f"fv{os.getpid() % 10000}") as sims:
        ids = register_devices(api, sims)
        try:
            yield _prepare(api, sims, ids, readable), sims
        finally:
            for dev_id in ids:
                store.delete_device(dev_id)


def _prepare(api: Any, sims: list[SimDevice], ids: list[str], readable: Path) -> tuple[list[str], Path]:
    artifacts = api.settings.data_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    marker = readable / "plugin-importers.txt"
    marker.write_text("")
    marker.chmod(0o666)  # every importer may note itself, the devices' accounts included
    (artifacts / "numpy_trainer.py").write_text(f"MARKER = {str(marker)!r}\n" + PLUGIN)
    body = {"playbook": "fl-client", "targets": ids, "extra_vars": {"python": PYTHON, "plugin": "numpy_trainer.py"}}
    status, job = api.call("POST", "/api/v1/provision", json=body)
    assert status == 202, job
    job = api.wait_job(job["id"], 120)
    assert job["state"] == "succeeded", job
    for s in sims:
        assert (s.home / ".evc" / "fl" / "plugins" / "numpy_trainer.py").is_file()
        assert (s.home / ".evc" / "fl" / "fl_models.py").is_file()
    status, job = api.call("POST", "/api/v1/fl/partition", json={"devices": ids, "name": "digits-vision"})
    assert status == 202, job
    assert api.wait_job(job["id"], 60)["state"] == "succeeded"
    return ids, marker


def _train(api: Any, ids: list[str], rounds: int, **extra: Any) -> Any:
    body = {"devices": ids, "data": {"path": DATA}, "rounds": rounds, "seed": 42, "python": PYTHON,
            "test_set": "digits-vision", "round_timeout": 30, **extra}  # fmt: skip
    status, job = api.call("POST", "/api/v1/fl/jobs", json=body)
    assert status == 202, job
    job = api.wait_job(job["id"], 120)
    assert job["state"] == "succeeded", job
    return api.call("GET", f"/api/v1/fl/jobs/{job['id']}")[1]


def _reference(model: str, n: int, rounds: int) -> Any:
    ds = load_reference_digits()
    parts = partition_iid(len(ds.y_train), n, 42)
    return simulate(make_strategy("fedavg", seed=42, model=model), load_model(model),
                    [(ds.X_train[i], ds.y_train[i]) for i in parts], rounds=rounds,
                    test=(ds.X_test, ds.y_test))  # fmt: skip


def _final(api: Any, job_id: str) -> list[np.ndarray]:
    directory = checkpoint_dir(api.settings)
    return load_checkpoint(directory, job_id, latest_round(directory, job_id)).params


def test_cnn_and_a_numpy_client_plugin_train_through_the_full_stack(api: Any, vision_fleet: Any) -> None:
    (ids, marker), _ = vision_fleet
    # the built-in CNN: the devices train exactly what the in-process reference computes
    view = _train(api, ids, 2, model="cnn")
    rounds = view["fl"]["rounds"]
    ref = _reference("cnn", 3, 2)
    assert [r["num_clients"] for r in rounds] == [3, 3] and not any(r["failures"] for r in rounds)
    for got, want in zip(rounds, ref.history, strict=True):
        assert got["eval_accuracy"] == pytest.approx(want["eval_accuracy"], abs=1e-12)
    for a, b in zip(_final(api, view["id"]), ref.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert rounds[-1]["eval_accuracy"] > 0.5

    # the plug-in: its own numpy softmax, so the same weights as the built-in softmax
    view = _train(api, ids, 2, model="plugin:numpy_trainer")
    rounds = view["fl"]["rounds"]
    assert [r["num_clients"] for r in rounds] == [3, 3] and not any(r["failures"] for r in rounds)
    assert rounds[-1]["eval_accuracy"] is None  # device code: never run on the controller
    for a, b in zip(_final(api, view["id"]), _reference("softmax", 3, 2).params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    status, err = api.call("POST", f"/api/v1/fl/jobs/{view['id']}/export", json={"name": "plug", "version": "1"})
    assert status == 409 and "device code" in err["message"], err  # no graph EVC knows, and never run here
    importers = marker.read_text().split()
    assert importers and set(importers) == {"client.py"}, importers  # devices only


def test_train_export_deploy_and_call_the_model(live: str, api: Any, vision_fleet: Any) -> None:
    """Issue 16.5, the whole loop as a user runs it: `evc fl start … --export NAME:VERSION` (a
    CNN on the digits task, registered as ONNX with its measured accuracy), then `evc deploy`, then
    the deployed model answers with the same predictions on the test set."""
    (ids, _), _ = vision_fleet
    name = f"fl-digits-{os.getpid() % 10000}"
    devices = [a for d in ids for a in ("--device", d)]
    code, out, both = evc(live, api.admin, "--json", "fl", "start", *devices, "--data", DATA, "--rounds", "3",
                          "--model", "cnn", "--seed", "42", "--python", PYTHON, "--test-set", "digits-vision",
                          "--export", f"{name}:1")  # fmt: skip
    assert code == 0, both
    view = json.loads(out)
    last = view["fl"]["rounds"][-1]
    assert view["params"]["export"] == {"name": name, "version": "1"}
    assert view["summary"]["exported"]["version"] == "1", view["summary"]
    status, exported = api.call("GET", f"/api/v1/models/{name}/versions/1")
    assert status == 200 and exported["format"] == "onnx" and exported["task"] == "classification"
    assert exported["sha256"] == view["summary"]["exported"]["sha256"]
    assert exported["accuracy"]["dataset"] == "digits-vision"
    assert exported["accuracy"]["value"] == pytest.approx(last["eval_accuracy"], abs=0.005)
    assert exported["metadata"]["inputs"][0]["name"] == "X"
    # exporting again: the same bytes answer the stored version; other cases are refused, saying why
    body = {"name": name, "version": "1"}
    assert api.call("POST", f"/api/v1/fl/jobs/{view['id']}/export", json=body)[0] == 200
    status, err = api.call("POST", f"/api/v1/fl/jobs/{view['id']}/export", json={**body, "round": 1})
    assert status == 409, err  # other weights under the same version
    status, err = api.call("POST", f"/api/v1/fl/jobs/{view['id']}/export", json={"name": "x y", "version": "1"})
    assert status == 422, err
    bad = {"devices": ids, "data": {"path": DATA}, "model": "plugin:numpy_trainer", "export": body}
    status, err = api.call("POST", "/api/v1/fl/jobs", json=bad)
    assert status == 422 and "no ONNX export" in err["message"], err

    port = free_port()
    code, out, both = evc(live, api.admin, "--json", "deploy", f"{name}:1", "--device", ids[0], "--port",
                          str(port), "--python", PYTHON, "--wait")  # fmt: skip
    assert code == 0, both
    try:
        ds = load_reference_digits()
        X = ds.X_test.astype(np.float32)
        request = {"inputs": [{"name": "X", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
        url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
        req = urllib.request.Request(url, json.dumps(request).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out_tensor = json.loads(resp.read())["outputs"][0]
        probs = np.asarray(out_tensor["data"], dtype=np.float64).reshape(out_tensor["shape"])
        assert probs.shape == (len(ds.y_test), 10)
        assert float(np.mean(probs.argmax(axis=1) == ds.y_test)) == exported["accuracy"]["value"]
    finally:
        _, page = api.call("GET", "/api/v1/deployments")
        for dep in page["items"]:
            if dep["model"] == name:
                api.wait_job(api.call("DELETE", f"/api/v1/deployments/{dep['id']}")[1]["id"], 60)
