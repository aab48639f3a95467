"""The model registry against a real Redis and a real Celery worker: register a real ONNX model
(softmax regression fitted on the shipped digits data), metadata, idempotency and immutability,
variants, download digests, EVC's int8 quantization with measured accuracy, the ``models``
scope, the hardware view, upload limits, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, cast

import numpy as np
import pytest

from evc.fl.data import Dataset, load_reference_digits
from evc.model import Device
from evc.store import new_id, now
from tests.fixtures.onnx_models import fit_softmax, sha, softmax_model, unique, upload

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_reference_digits()


@pytest.fixture(scope="module")
def weights(digits: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return fit_softmax(digits)


@pytest.fixture(scope="module")
def model_bytes(weights: tuple[np.ndarray, np.ndarray]) -> bytes:
    return softmax_model(*weights)


@pytest.fixture(scope="module")
def eval_npz(digits: Dataset) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, X=digits.X_test.astype(np.float32), y=digits.y_test.astype(np.int64))
    return buf.getvalue()


# ----------------------------------------------------------------------------- tests
def test_register_metadata_idempotent_immutable(api, flush, model_bytes) -> None:
    name = unique()
    meta = {
        "name": name, "version": "1.0", "task": "classification", "labels": {"team": "vision"},
        "accuracy": {"dataset": "digits-test", "value": 0.95}, "license": "Apache-2.0",
    }  # fmt: skip
    status, rec = upload(api, model_bytes, meta)
    assert status == 201, rec
    assert rec["sha256"] == sha(model_bytes) and rec["digest"] == f"sha256:{sha(model_bytes)}"
    assert rec["size"] == len(model_bytes) and rec["format"] == "onnx" and rec["deployed"] is False
    assert rec["accuracy"] == {"dataset": "digits-test", "value": 0.95} and rec["license"] == "Apache-2.0"
    md = rec["metadata"]
    assert md["inputs"] == [{"name": "X", "type": "float32", "shape": ["N", 64]}]
    assert md["outputs"] == [{"name": "probs", "type": "float32", "shape": ["N", 10]}]
    assert md["opset"] == 17 and md["parameters"] == 64 * 10 + 10
    assert md["operations"] == {"Add": 1, "MatMul": 1, "Softmax": 1}
    assert md["flops"] == 2 * 64 * 10 and md["flops_by_op"] == {"MatMul": 1280}
    assert rec["created_by"] == "operator:test-admin"

    again_status, again = upload(api, model_bytes, meta)  # the same bytes: the same record, 200
    assert again_status == 200 and again["created_at"] == rec["created_at"]
    other = model_bytes.replace(b"evc-test", b"evc-tesX")
    status, body = upload(api, other, meta)
    assert status == 409 and "immutable" in body["message"] and sha(model_bytes) in body["message"]

    assert api.call("GET", f"/api/v1/models/{name}/versions/1.0", token="read")[1]["sha256"] == sha(model_bytes)
    status, model = api.call("GET", f"/api/v1/models/{name}")
    assert status == 200 and model["latest"] == "1.0" and [v["version"] for v in model["versions"]] == ["1.0"]
    assert upload(api, model_bytes, {**meta, "version": "1.1", "task": "other"})[0] == 201
    status, page = api.call("GET", "/api/v1/models?task=classification&label=team=vision")
    assert status == 200 and [m["name"] for m in page["items"]] == [name]
    assert [v["version"] for v in page["items"][0]["versions"]] == ["1.0"]
    assert api.call("GET", "/api/v1/models?task=nothing")[1]["total"] == 0
    assert api.call("GET", "/api/v1/models?limit=1")[1]["limit"] == 1

    resp = api.client.get(
        f"/api/v1/models/{name}/versions/1.0/download", headers={"Authorization": f"Bearer {api.admin}"}
    )
    assert resp.status_code == 200 and resp.data == model_bytes
    assert resp.headers["X-Content-SHA256"] == sha(model_bytes) == sha(resp.data)
    assert "attachment" in resp.headers["Content-Disposition"]

    audit, _ = api.store.audit_log(0, 50)
    assert any(a["action"] == "model.register" and a["target"] == f"{name}:1.0" for a in audit)
    assert api.call("GET", f"/api/v1/models/{name}/versions/9")[0] == 404
    assert api.call("GET", "/api/v1/models/nope")[0] == 404


def test_bad_uploads_are_clear_4xx(api, flush, model_bytes) -> None:
    status, body = upload(api, b"not a model at all", {"name": unique(), "version": "1"})
    assert status == 422 and "not an ONNX model" in body["message"]
    status, body = upload(api, model_bytes, {"name": "bad:name", "version": "1"})
    assert status == 422 and "metadata" in body["message"] and "name" in body["message"]
    form = {"metadata": "{not json", "file": (io.BytesIO(model_bytes), "m.onnx")}
    status, body = api.call("POST", "/api/v1/models", data=form, content_type="multipart/form-data")
    assert status == 422 and "JSON object" in body["message"]
    status, body = api.call(
        "POST", "/api/v1/models", data={"metadata": json.dumps({"name": "a", "version": "1"})},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert status == 422 and "file" in body["message"]
    status, body = upload(api, model_bytes, {"name": unique(), "version": "1", "accuracy": {"value": 1}})
    assert status == 422 and "dataset" in body["message"]
    # another format is stored as is, not read
    status, rec = upload(api, b"\x00weights", {"name": unique(), "version": "1", "format": "tflite"})
    assert status == 201 and rec["metadata"] is None and rec["format"] == "tflite"
    status, body = api.call("POST", f"/api/v1/models/{rec['name']}/versions/1/quantize")
    assert status == 422 and "only ONNX" in body["message"]


def test_upload_limit_is_a_413_that_says_it(settings, store, model_bytes) -> None:
    from evc.api.app import create_app

    from tests.fixtures.services import API

    small = API(create_app(settings.replace(model_max_upload_bytes=1024)), store, settings)
    status, body = upload(small, b"x" * 2048, {"name": unique(), "version": "1"})
    assert status == 413 and "limit of 1 KiB" in body["message"]
    status, body = upload(small, b"x" * (3 * 1024 * 1024), {"name": unique(), "version": "1"})
    assert status == 413 and "model_max_upload_bytes" in body["message"]
    # the rest of the API keeps its 1 MiB body limit and message
    resp = small.client.post(
        "/api/v1/jobs", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={"Authorization": f"Bearer {small.admin}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status_code == 413 and "the body is larger than" in resp.get_json()["message"]


def test_variants_linked_to_their_parent(api, flush, model_bytes, weights) -> None:
    name = unique()
    assert upload(api, model_bytes, {"name": name, "version": "2"})[0] == 201
    w, b = weights
    half = softmax_model(w.astype(np.float16).astype(np.float32), b)
    path = f"/api/v1/models/{name}/versions/2/variants"
    meta = {"variant": "fp16w", "accuracy": {"dataset": "digits-test", "value": 0.9}}
    status, var = upload(api, half, meta, path=path)
    assert status == 201, var
    assert var["parent"] == {"name": name, "version": "2", "sha256": sha(model_bytes)}
    assert var["sha256"] == sha(half) and var["source"] == "upload" and var["metadata"]["parameters"] == 650
    assert upload(api, half, meta, path=path)[0] == 200
    assert upload(api, model_bytes, meta, path=path)[0] == 409
    assert upload(api, half, {"variant": "Bad Name"}, path=path)[0] == 422
    assert upload(api, half, meta, path=f"/api/v1/models/{name}/versions/404/variants")[0] == 404
    shown = api.call("GET", f"/api/v1/models/{name}/versions/2")[1]
    assert [v["variant"] for v in shown["variants"]] == ["fp16w"]
    resp = api.client.get(
        f"{path[: -len('/variants')]}/download?variant=fp16w", headers={"Authorization": f"Bearer {api.admin}"}
    )
    assert resp.data == half and resp.headers["X-Content-SHA256"] == sha(half)

    # deleting the version removes its variants and the blobs nothing else uses
    status, gone = api.call("DELETE", f"/api/v1/models/{name}/versions/2")
    assert status == 200 and gone["variants"][0]["variant"] == "fp16w"
    assert api.call("GET", f"/api/v1/models/{name}/versions/2")[0] == 404
    blobs = api.settings.data_dir / "models" / "blobs" / "sha256"
    assert not (blobs / sha(half)).exists()
    audit, _ = api.store.audit_log(0, 50)
    assert any(a["action"] == "model.delete" and a["target"] == f"{name}:2" for a in audit)


def test_quantize_makes_a_working_int8_variant_with_measured_accuracy(
    api, worker, flush, model_bytes, eval_npz, digits
) -> None:
    import onnxruntime as ort

    name = unique()
    assert upload(api, model_bytes, {"name": name, "version": "1", "task": "classification"})[0] == 201
    form = {"eval_set": (io.BytesIO(eval_npz), "digits-test.npz"), "dataset": "digits-test"}
    status, job = api.call(
        "POST", f"/api/v1/models/{name}/versions/1/quantize", data=form, content_type="multipart/form-data"
    )
    assert status == 202 and job["kind"] == "model-quantize", job
    job = api.wait_job(job["id"], timeout=120)
    assert job["state"] == "succeeded", job
    ev = job["summary"]["evaluation"]
    assert ev["samples"] == len(digits.y_test) and ev["dataset"] == "digits-test"
    assert ev["parent"] > 0.9 and abs(ev["parent"] - ev["variant"]) < 0.03, ev

    version = api.call("GET", f"/api/v1/models/{name}/versions/1")[1]
    (var,) = version["variants"]
    assert var["variant"] == "int8" and var["source"] == "evc-quantize" and var["task"] == "classification"
    assert var["accuracy"] == {"dataset": "digits-test", "value": ev["variant"]}
    assert var["evaluation"]["parent"] == ev["parent"] and var["parent"]["sha256"] == sha(model_bytes)
    assert var["created_by"] == "operator:test-admin"
    assert "MatMulInteger" in var["metadata"]["operations"] or "DynamicQuantizeLinear" in var["metadata"]["operations"]

    resp = api.client.get(
        f"/api/v1/models/{name}/versions/1/download?variant=int8", headers={"Authorization": f"Bearer {api.admin}"}
    )
    sess = ort.InferenceSession(resp.data, providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"X": digits.X_test[:50].astype(np.float32)})[0]
    assert probs.shape == (50, 10) and float((probs.argmax(1) == digits.y_test[:50]).mean()) > 0.85

    # again, with the evaluation set stored by the first request: the same variant (idempotent)
    eval_sha = ev["eval_set"]
    status, job2 = api.call(
        "POST", f"/api/v1/models/{name}/versions/1/quantize", data={"eval_set_sha256": eval_sha},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert status == 202
    job2 = api.wait_job(job2["id"], timeout=120)
    assert job2["state"] == "succeeded" and job2["summary"]["created"] is False, job2
    status, body = api.call(
        "POST", f"/api/v1/models/{name}/versions/1/quantize", data={"eval_set_sha256": "0" * 64},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert status == 422 and "no evaluation set" in body["message"]
    assert api.call("POST", f"/api/v1/models/{name}/versions/7/quantize")[0] == 404

    # the evaluation sets kept: listed, deleted (the blob freed), then unknown
    status, sets = api.call("GET", "/api/v1/eval-sets")
    eval_sha = eval_sha.removeprefix("sha256:")
    (kept,) = [e for e in sets["items"] if e["sha256"] == eval_sha]
    assert kept["dataset"] == "digits-test" and kept["samples"] == len(digits.y_test) and kept["size"] > 0
    assert api.call("DELETE", f"/api/v1/eval-sets/{eval_sha}")[0] == 200
    assert not (api.settings.data_dir / "models" / "blobs" / "sha256" / eval_sha).exists()
    assert eval_sha not in [e["sha256"] for e in api.call("GET", "/api/v1/eval-sets")[1]["items"]]
    assert api.call("DELETE", f"/api/v1/eval-sets/{eval_sha}")[0] == 404
    status, body = api.call(
        "POST", f"/api/v1/models/{name}/versions/1/quantize", data={"eval_set_sha256": eval_sha},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert status == 422 and "no evaluation set" in body["message"]


def _cluster_with_device(store: Any) -> tuple[str, str]:
    from evc.devices import new_record

    cl_id = new_id("cl")
    store.create_cluster({
        "id": cl_id, "name": unique("hw"), "profile": "direct", "target_level": 0, "labels": {}, "vars": {},
        "server_id": None, "created_at": now(), "created_by": "test",
    })  # fmt: skip
    dev = dict(new_record({"name": unique("jetson"), "host": "10.0.0.9", "username": "pi"}, created_by="test"))
    dev.update(
        state="online", privilege="sudo",
        facts={"arch": "aarch64", "os": "Ubuntu 20.04", "cpus": 6, "memory_bytes": 8 << 30, "python3": "3.8.10",
               "docker": True, "containerd": False, "systemd": True, "gpus": [], "jetson": "Xavier NX"},
        health={"load1": 3.0, "load5": 2.0, "load15": 1.0, "mem_used_ratio": 0.5, "checked_at": now(), "source": "ssh"},
    )  # fmt: skip
    dev_id = str(dev["id"])
    store.create_device(cast(Device, dev), token_hash="h-" + dev_id)
    assert store.claim_membership(cl_id, dev_id) is None
    return cl_id, dev_id


def test_models_scope_pushes_and_reads_hardware_nothing_else(api, flush, model_bytes) -> None:
    status, tok = api.call("POST", "/api/v1/tokens", json={"name": unique("evf"), "scopes": ["models"]})
    assert status == 201, tok
    evf = tok["token"]
    name = unique()
    status, rec = upload(api, model_bytes, {"name": name, "version": "1"}, token=evf)
    assert status == 201 and rec["created_by"].startswith("operator:evf-")
    assert (
        upload(api, model_bytes, {"variant": "fp32"}, path=f"/api/v1/models/{name}/versions/1/variants", token=evf)[0]
        == 201
    )
    assert api.call("GET", "/api/v1/models", token=evf)[0] == 200
    assert api.call("GET", f"/api/v1/models/{name}/versions/1", token=evf)[0] == 200

    cl_id, dev_id = _cluster_with_device(api.store)
    status, hw = api.call("GET", f"/api/v1/clusters/{cl_id}/hardware", token=evf)
    assert status == 200, hw
    (d,) = hw["devices"]
    assert d["id"] == dev_id and d["arch"] == "aarch64" and d["cpus"] == 6 and d["memory_bytes"] == 8 << 30
    assert d["accelerators"] == [{"kind": "jetson", "name": "Xavier NX"}]
    assert d["runtimes"]["docker"] is True and d["runtimes"]["python3"] == "3.8.10"
    assert d["runtimes"]["podman"] is False
    assert d["load"]["load1"] == 3.0 and d["load"]["load1_per_cpu"] == 0.5
    assert api.call("GET", f"/api/v1/clusters/{cl_id}/hardware", token="read")[0] == 200
    assert api.call("GET", "/api/v1/clusters/cl_nope/hardware", token=evf)[0] == 404

    # nothing else: no devices, no reads outside models and hardware, no delete, no quantize
    body = {"name": unique("d"), "host": "10.0.0.1", "username": "pi"}
    assert api.call("POST", "/api/v1/devices", token=evf, json=body)[0] == 403
    assert api.call("GET", "/api/v1/devices", token=evf)[0] == 403
    assert api.call("GET", f"/api/v1/clusters/{cl_id}", token=evf)[0] == 403
    status, body = api.call("DELETE", f"/api/v1/models/{name}/versions/1", token=evf)
    assert status == 403 and "admin" in body["message"]
    assert api.call("POST", f"/api/v1/models/{name}/versions/1/quantize", token=evf)[0] == 403
    # a read token reads models but cannot push
    status, body = upload(api, model_bytes, {"name": unique(), "version": "1"}, token="read")
    assert status == 403 and "models" in body["message"]
    assert api.call("DELETE", f"/api/v1/models/{name}/versions/1")[0] == 200


def test_openapi_documents_the_registry(api) -> None:
    spec = api.call("GET", "/api/v1/openapi.json", token=None)[1]
    assert "multipart/form-data" in spec["paths"]["/api/v1/models"]["post"]["requestBody"]["content"]
    for p in (
        "/api/v1/models/{name}/versions/{version}/download",
        "/api/v1/models/{name}/versions/{version}/variants",
        "/api/v1/models/{name}/versions/{version}/quantize",
        "/api/v1/clusters/{cluster_id}/hardware",
    ):
        assert p in spec["paths"], p


def test_cli_push_list_show_variant_quantize_rm(api, worker, flush, live, model_bytes, eval_npz, tmp_path) -> None:
    from tests.fixtures.cli import evc

    model = tmp_path / "digits.onnx"
    model.write_bytes(model_bytes)
    evalset = tmp_path / "eval.npz"
    evalset.write_bytes(eval_npz)
    name = unique()
    code, out, text = evc(live, api.admin, "model", "push", str(model), "--name", name, "--version", "1",
                          "--task", "classification", "--label", "team=vision")  # fmt: skip
    assert code == 0 and sha(model_bytes)[:12] in text, text
    code, out, text = evc(live, api.admin, "model", "push", str(model), "--name", name, "--version", "1")
    assert code == 0 and "already registered" in text, text
    code, out, text = evc(live, api.admin, "model", "list")
    assert code == 0 and name in text
    code, out, text = evc(live, api.admin, "--json", "model", "show", f"{name}:1")
    assert code == 0 and json.loads(out)["sha256"] == sha(model_bytes)
    code, out, text = evc(live, api.admin, "model", "show", name)
    assert code == 0 and "1" in text
    code, out, text = evc(live, api.admin, "model", "variant", f"{name}:1", str(model), "--variant", "fp32")
    assert code == 0 and "fp32" in text, text
    code, out, text = evc(live, api.admin, "model", "quantize", f"{name}:1", "--eval-set", str(evalset), "--wait")
    assert code == 0 and "int8" in text and "top-1" in text, text
    kept = hashlib.sha256(evalset.read_bytes()).hexdigest()
    code, out, text = evc(live, api.admin, "model", "eval-sets")
    assert code == 0 and kept[:12] in text, text
    code, out, text = evc(live, api.admin, "model", "eval-sets", "--rm", kept)
    assert code == 0 and f"deleted evaluation set sha256:{kept}" in text, text
    code, out, text = evc(live, api.admin, "model", "variant", f"{name}:1", "--variant", "x")
    assert code != 0 and "FILE or --oci-ref" in text, text
    code, out, text = evc(live, api.admin, "model", "rm", f"{name}:1")
    assert code == 0 and "deleted" in text
    code, out, text = evc(live, api.admin, "model", "show", f"{name}:1")
    assert code != 0 and "not found" in text


def test_uploads_are_written_once(api, flush, model_bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The multipart parser writes the file into the blob store's temporary area, hashing it as
    it arrives; registering adopts that file (no second copy), and nothing is left behind."""
    from evc.models import blobs

    def copy(*args: Any, **kw: Any) -> None:
        raise AssertionError("the upload was copied a second time")

    tmp = api.settings.data_dir / "models" / "tmp"
    big = model_bytes + b"\0" * (3 << 20)  # past what Werkzeug keeps in memory (stored as format bin)
    monkeypatch.setattr(blobs.Staged, "__init__", copy)
    name = unique()
    status, rec = upload(api, model_bytes, {"name": name, "version": "1"})
    assert status == 201 and rec["sha256"] == sha(model_bytes), rec
    status, rec = upload(api, big, {"name": name, "version": "2", "format": "bin"})
    assert status == 201 and rec["sha256"] == sha(big) and rec["size"] == len(big), rec
    path = f"/api/v1/models/{name}/versions/1/variants"
    assert upload(api, big, {"variant": "raw", "format": "bin"}, path=path)[0] == 201
    assert not list(tmp.glob("upload-*"))
    # a refused request leaves nothing either
    status, _ = upload(api, big, {"name": name, "version": "3", "bogus": 1})
    assert status == 422 and not list(tmp.glob("upload-*"))
    resp = api.client.get(
        f"/api/v1/models/{name}/versions/2/download", headers={"Authorization": f"Bearer {api.admin}"}
    )
    assert resp.data == big
