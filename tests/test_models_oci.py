"""The model registry's OCI backend against a REAL registry: Debian's ``docker-registry`` (the
reference distribution registry) started by the tests on a free loopback port with filesystem
storage. Upload/download round trip through the API, the artifact's ORAS-style manifest,
register-by-reference with digest pinning (both storage backends), tampered and missing blobs
refused, the CLI's ``model push --oci-ref``.

Without the ``docker-registry`` binary the tests skip (``apt-get install docker-registry``;
``scripts/bootstrap test`` installs it when it may), except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from evc.fl.data import load_reference_digits
from evc.models import oci
from tests.fixtures.cli import evc
from tests.fixtures.helpers import free_port, wait_until
from tests.fixtures.onnx_models import fit_softmax, sha, softmax_model, unique, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    """A real ONNX model (softmax regression on the shipped digits data, as in test_models)."""
    return softmax_model(*fit_softmax(load_reference_digits(), steps=50))


@dataclass
class RegistryProcess:
    proc: subprocess.Popen[bytes]
    root: Path
    port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to tamper with them)."""
        hexd = digest.removeprefix("sha256:")
        return self.root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def registry_binary() -> str:
    path = os.environ.get("EVC_TEST_DOCKER_REGISTRY") or shutil.which("docker-registry")
    if path:
        return path
    reason = (
        "docker-registry is not installed: the OCI storage tests need a real registry "
        "(apt-get install docker-registry, or set EVC_TEST_DOCKER_REGISTRY)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this is an error, not a skip", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def start_registry(work: Path, auth: dict[str, Any] | None = None) -> Iterator[RegistryProcess]:
    """``docker-registry serve`` on a free loopback port, filesystem storage under *work*,
    deletes allowed (and *auth*, the registry's ``auth`` section, when given)."""
    binary = registry_binary()
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "evc-test-" + os.urandom(8).hex()},
    }
    if auth:
        cfg["auth"] = auth
    (work / "config.yml").write_text(json.dumps(cfg))  # YAML is a superset of JSON
    log = open(work / "registry.log", "wb")
    proc = subprocess.Popen([binary, "serve", str(work / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    srv = RegistryProcess(proc, work / "data", port)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"docker-registry exited: {(work / 'registry.log').read_text()[-2000:]}")
        try:
            return requests.get(f"{srv.url}/v2/", timeout=1).status_code in (200, 401)
        except requests.RequestException:
            return False

    try:
        wait_until(up, 20, "docker-registry to answer /v2/")
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """The test registry (no authentication)."""
    with start_registry(tmp_path_factory.mktemp("oci-registry")) as srv:
        yield srv


@pytest.fixture(scope="module")
def oci_api(api: Any, oci_registry: RegistryProcess) -> Any:
    """The API with the OCI backend on the test registry (same store as the ``api`` fixture)."""
    from evc.api.app import create_app

    from tests.fixtures.services import API

    s = api.settings.replace(
        model_storage="oci", model_registry_url=oci_registry.url, model_registry_insecure=True,
        model_registry_repository="evc-test/models",
    )  # fmt: skip
    return API(create_app(s), api.store, s)


@pytest.fixture(scope="module")
def ref_api(api: Any, oci_registry: RegistryProcess) -> Any:
    """The API with the embedded backend that may pull from the loopback registry over http."""
    from evc.api.app import create_app

    from tests.fixtures.services import API

    s = api.settings.replace(model_registry_insecure=True, model_registry_pull_hosts=f"other:5000,{oci_registry.host}")
    return API(create_app(s), api.store, s)


def push_foreign(
    srv: RegistryProcess, repo: str, tag: str, data: bytes, media_type: str = "application/octet-stream"
) -> str:
    """Push *data* as a one-layer artifact the way another tool (oras push) would; the manifest
    digest."""
    reg = oci.Registry(srv.url, insecure=True)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    reg.push_blob(repo, digest, len(data), io.BytesIO(data))
    reg.push_blob(repo, oci.EMPTY_DIGEST, 2, io.BytesIO(oci.EMPTY_JSON))
    doc = {
        "schemaVersion": 2, "mediaType": oci.MANIFEST_TYPE, "artifactType": "application/vnd.example.model",
        "config": {"mediaType": oci.EMPTY_TYPE, "digest": oci.EMPTY_DIGEST, "size": 2},
        "layers": [{"mediaType": media_type, "digest": digest, "size": len(data),
                    "annotations": {oci.ANNOTATION_TITLE: "model.onnx"}}],
    }  # fmt: skip
    return reg.put_manifest(repo, tag, doc)


def manifest(srv: RegistryProcess, pinned: str) -> requests.Response:
    repo, digest = pinned.split("/", 1)[1].split("@")
    return requests.get(f"{srv.url}/v2/{repo}/manifests/{digest}", headers={"Accept": oci.MANIFEST_TYPE}, timeout=5)


# ----------------------------------------------------------------------------- tests
def test_oci_backend_round_trip(oci_api, oci_registry, flush, model_bytes) -> None:
    name = unique("Digits")  # upper case: the repository name is lowered and hashed
    status, rec = upload(oci_api, model_bytes, {"name": name, "version": "1.0", "task": "classification"})
    assert status == 201, rec
    assert rec["sha256"] == sha(model_bytes) and rec["metadata"]["parameters"] == 650
    st = rec["storage"]
    assert st["backend"] == "oci" and st["ref"].startswith(f"{oci_registry.host}/evc-test/models/digits-")
    assert "@sha256:" in st["ref"]
    # nothing in the embedded blob store: the registry holds it, as an ORAS-style artifact
    assert not (oci_api.settings.data_dir / "models" / "blobs" / "sha256" / sha(model_bytes)).exists()
    r = manifest(oci_registry, st["ref"])
    assert r.status_code == 200
    doc = r.json()
    assert doc["artifactType"] == oci.ARTIFACT_TYPE and doc["config"]["mediaType"] == oci.EMPTY_TYPE
    (layer,) = doc["layers"]
    assert layer["mediaType"] == "application/vnd.evc.model.layer.v1.onnx"
    assert layer["digest"] == f"sha256:{sha(model_bytes)}" and layer["size"] == len(model_bytes)
    assert doc["annotations"][oci.ANNOTATION_NAME] == name and doc["annotations"][oci.ANNOTATION_VERSION] == "1.0"
    assert doc["annotations"][oci.ANNOTATION_SHA256] == sha(model_bytes)
    tag = requests.get(f"{oci_registry.url}/v2/{st['ref'].split('/', 1)[1].split('@')[0]}/tags/list", timeout=5)
    assert tag.json()["tags"] == ["1.0"]

    # the same bytes again: the stored record; a variant goes to its own tag
    again_status, again = upload(oci_api, model_bytes, {"name": name, "version": "1.0"})
    assert again_status == 200 and again["storage"] == st
    half = softmax_model(*[w * 0.5 for w in _weights(model_bytes)])
    path = f"/api/v1/models/{name}/versions/1.0/variants"
    vstatus, var = upload(oci_api, half, {"variant": "w0.5"}, path=path)
    assert vstatus == 201 and var["storage"]["backend"] == "oci"

    # download through the API: pulled from the registry, verified, the bytes
    resp = oci_api.client.get(
        f"/api/v1/models/{name}/versions/1.0/download", headers={"Authorization": f"Bearer {oci_api.admin}"}
    )
    assert resp.status_code == 200 and resp.data == model_bytes
    assert resp.headers["X-Content-SHA256"] == sha(model_bytes)
    resp = oci_api.client.get(
        f"/api/v1/models/{name}/versions/1.0/download?variant=w0.5",
        headers={"Authorization": f"Bearer {oci_api.admin}"},
    )
    assert resp.status_code == 200 and resp.data == half
    assert not list((oci_api.settings.data_dir / "models" / "tmp").glob("pull-*"))  # the copies are gone

    # delete removes the manifests from the registry
    status, _ = oci_api.call("DELETE", f"/api/v1/models/{name}/versions/1.0")
    assert status == 200
    assert manifest(oci_registry, st["ref"]).status_code == 404
    assert manifest(oci_registry, var["storage"]["ref"]).status_code == 404


def _weights(model: bytes) -> list[Any]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model)
    return [numpy_helper.to_array(t) for t in m.graph.initializer]


@pytest.mark.parametrize("backend", ["embedded", "oci"])
def test_register_by_reference_pins_digest(backend, ref_api, oci_api, oci_registry, flush, model_bytes) -> None:
    a = oci_api if backend == "oci" else ref_api
    repo = f"elsewhere/{backend}/digits"
    mdigest = push_foreign(oci_registry, repo, "v1", model_bytes)
    name = unique()
    body = {"name": name, "version": "1", "task": "classification", "oci_ref": f"{oci_registry.host}/{repo}:v1"}
    status, rec = a.call("POST", "/api/v1/models", json=body)
    assert status == 201, rec
    assert rec["oci_ref"] == f"{oci_registry.host}/{repo}@{mdigest}"  # pinned, the tag gone
    assert rec["sha256"] == sha(model_bytes) and rec["format"] == "onnx" and rec["task"] == "classification"
    assert rec["metadata"]["inputs"] == [{"name": "X", "type": "float32", "shape": ["N", 64]}]
    assert rec["storage"]["backend"] == backend
    # the tag moves on: the record stays pinned to what was pulled
    push_foreign(oci_registry, repo, "v1", model_bytes.replace(b"evc-test", b"evc-tesX"))
    again_status, again = a.call("POST", "/api/v1/models", json=body)
    assert again_status == 409 and "immutable" in again["message"]
    # by digest: the pinned reference registers (the same bytes: the stored record)
    status, same = a.call("POST", "/api/v1/models", json={**body, "oci_ref": rec["oci_ref"]})
    assert status == 200 and same["oci_ref"] == rec["oci_ref"]
    status, other = a.call("POST", "/api/v1/models", json={**body, "version": "2", "oci_ref": rec["oci_ref"]})
    assert status == 201 and other["oci_ref"] == rec["oci_ref"]
    resp = a.client.get(f"/api/v1/models/{name}/versions/2/download", headers={"Authorization": f"Bearer {a.admin}"})
    assert resp.status_code == 200 and resp.data == model_bytes
    # a reference to nothing, and no reference at all
    status, body2 = a.call(
        "POST", "/api/v1/models", json={**body, "version": "3", "oci_ref": f"{oci_registry.host}/none/here:v9"}
    )
    assert status == 422 and "no artifact" in body2["message"]
    status, body3 = a.call("POST", "/api/v1/models", json={**body, "version": "3", "oci_ref": "not a ref"})
    assert status == 422 and "not an OCI reference" in body3["message"]
    # only the configured registry and model_registry_pull_hosts: a caller cannot make EVC probe the network
    status, body4 = a.call("POST", "/api/v1/models", json={**body, "version": "3", "oci_ref": "10.1.2.3:22/x/y:z"})
    assert status == 422 and "does not pull from 10.1.2.3:22" in body4["message"]


def test_register_a_variant_by_reference(ref_api, oci_registry, flush, model_bytes) -> None:
    """A variant by reference, as a version: pulled once, verified, pinned; JSON or multipart."""
    a = ref_api
    half = softmax_model(*[w * 0.5 for w in _weights(model_bytes)])
    repo = "elsewhere/variants/digits"
    mdigest = push_foreign(oci_registry, repo, "w05", half)
    name = unique()
    assert upload(a, model_bytes, {"name": name, "version": "1"})[0] == 201
    path = f"/api/v1/models/{name}/versions/1/variants"
    body = {"variant": "w0.5", "oci_ref": f"{oci_registry.host}/{repo}:w05", "accuracy": {"dataset": "d", "value": 0.9}}
    status, var = a.call("POST", path, json=body)
    assert status == 201, var
    assert var["oci_ref"] == f"{oci_registry.host}/{repo}@{mdigest}" and var["source"] == "oci"
    assert var["sha256"] == sha(half) and var["parent"]["sha256"] == sha(model_bytes)
    assert var["metadata"]["inputs"] == [{"name": "X", "type": "float32", "shape": ["N", 64]}]
    status, again = a.call("POST", path, json={**body, "oci_ref": var["oci_ref"]})
    assert status == 200 and again["sha256"] == var["sha256"]
    # multipart: the reference in metadata, no file
    form = {"metadata": json.dumps({"variant": "w0.5b", "oci_ref": var["oci_ref"]})}
    status, other = a.call("POST", path, data=form, content_type="multipart/form-data")
    assert status == 201 and other["sha256"] == sha(half), other
    resp = a.client.get(f"/api/v1/models/{name}/versions/1/download?variant=w0.5",
                        headers={"Authorization": f"Bearer {a.admin}"})  # fmt: skip
    assert resp.status_code == 200 and resp.data == half
    assert a.call("POST", path, json={"variant": "x", "oci_ref": "10.1.2.3:22/x/y:z"})[0] == 422
    assert a.call("POST", path, json={"variant": "x"})[0] == 422  # neither file nor reference
    assert a.call("POST", f"/api/v1/models/{name}/versions/9/variants", json=body)[0] == 404


def test_tampered_and_missing_blobs_are_refused(oci_api, oci_registry, flush, model_bytes) -> None:
    # register by reference from a registry whose blob was changed on disk
    data = model_bytes.replace(b"evc-test", b"evc-tamp")
    repo = "elsewhere/tampered"
    push_foreign(oci_registry, repo, "v1", data)
    blob = oci_registry.blob_file("sha256:" + sha(data))
    blob.write_bytes(data.replace(b"evc-tamp", b"EVIL-tmp"))
    body = {"name": unique(), "version": "1", "oci_ref": f"{oci_registry.host}/{repo}:v1"}
    status, err = oci_api.call("POST", "/api/v1/models", json=body)
    assert status == 502 and err["error"] == "digest_mismatch", err
    assert "tampered" in err["message"] and sha(data) in err["message"]
    assert oci_api.store.get_model_version(body["name"], "1") is None

    # a missing blob
    data2 = model_bytes.replace(b"evc-test", b"evc-miss")
    push_foreign(oci_registry, "elsewhere/missing", "v1", data2)
    oci_registry.blob_file("sha256:" + sha(data2)).unlink()
    status, err = oci_api.call(
        "POST", "/api/v1/models", json={**body, "oci_ref": f"{oci_registry.host}/elsewhere/missing:v1"}
    )
    assert status == 422 and "missing" in err["message"] and sha(data2) in err["message"], err

    # a model stored in the registry and damaged there: the download is refused, not sent
    data3 = model_bytes.replace(b"evc-test", b"evc-dmg1")
    name = unique()
    status, rec = upload(oci_api, data3, {"name": name, "version": "1"})
    assert status == 201, rec
    oci_registry.blob_file("sha256:" + sha(data3)).write_bytes(data3.replace(b"evc-dmg1", b"evc-dmg2"))
    resp = oci_api.client.get(
        f"/api/v1/models/{name}/versions/1/download", headers={"Authorization": f"Bearer {oci_api.admin}"}
    )
    assert resp.status_code == 500 and resp.get_json()["error"] == "corrupt"
    assert "corrupt" in resp.get_json()["message"]


def test_cli_push_oci_ref(oci_api, oci_registry, flush, model_bytes) -> None:
    srv = make_server("127.0.0.1", 0, oci_api.app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        mdigest = push_foreign(oci_registry, "elsewhere/cli", "latest", model_bytes)
        name = unique()
        ref = f"{oci_registry.host}/elsewhere/cli:latest"
        code, out, both = evc(url, oci_api.admin, "model", "push", "--name", name, "--version", "1", "--oci-ref", ref)
        assert code == 0, both
        flat = "".join(both.split())  # rich wraps long lines
        assert f"sha256:{sha(model_bytes)}" in flat and f"elsewhere/cli@{mdigest}" in flat
        code, out, both = evc(url, oci_api.admin, "model", "show", f"{name}:1")
        assert code == 0 and f"elsewhere/cli@{mdigest}" in "".join(both.split()), both
        code, out, both = evc(url, oci_api.admin, "model", "push", "--name", name, "--version", "1")
        assert code != 0 and "either FILE or --oci-ref" in both
        code, out, both = evc(url, oci_api.admin, "model", "variant", f"{name}:1", "--variant", "same", "--oci-ref",
                              ref)  # fmt: skip
        assert code == 0 and "variant same" in both, both
    finally:
        srv.shutdown()


class _TokenService(BaseHTTPRequestHandler):
    """A registry token service: a token for the right basic credentials, 401 otherwise."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        auth = self.headers.get("Authorization", "")
        type(self).seen.append(auth)
        ok = auth == "Basic " + base64.b64encode(b"evc:s3cret").decode()
        body = json.dumps({"token": "evc-test-token"} if ok else {"errors": ["denied"]}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_registry_credentials_from_the_data_dir(api, flush, model_bytes, tmp_path) -> None:
    """A registry that wants a bearer token (the ``silly`` access controller: a challenge
    naming a token service, then any token): EVC gets one from the token service with the
    credentials of its file, and says so clearly when it has none."""
    from evc.api.app import create_app

    from tests.fixtures.services import API

    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenService)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    realm = f"http://127.0.0.1:{tokens.server_port}/token"
    try:
        with start_registry(tmp_path / "reg", auth={"silly": {"realm": realm, "service": "evc-test"}}) as srv:
            creds = tmp_path / "creds.json"
            s = api.settings.replace(
                model_storage="oci", model_registry_url=srv.url, model_registry_insecure=True,
                model_registry_credentials=str(creds),
            )  # fmt: skip
            a = API(create_app(s), api.store, s)
            status, err = upload(a, model_bytes, {"name": unique(), "version": "1"})
            assert status == 502 and "wants credentials" in err["message"] and srv.host in err["message"], err
            creds.write_text(json.dumps({"username": "evc", "password": "wrong"}))
            status, err = upload(a, model_bytes, {"name": unique(), "version": "1"})
            assert status == 502 and "refused the credentials" in err["message"], err
            creds.write_text(json.dumps({"username": "evc", "password": "s3cret"}))
            name = unique()
            status, rec = upload(a, model_bytes, {"name": name, "version": "1"})
            assert status == 201 and rec["storage"]["backend"] == "oci", rec
            resp = a.client.get(
                f"/api/v1/models/{name}/versions/1/download", headers={"Authorization": f"Bearer {a.admin}"}
            )
            assert resp.status_code == 200 and resp.data == model_bytes
            assert "Basic " + base64.b64encode(b"evc:s3cret").decode() in _TokenService.seen
    finally:
        tokens.shutdown()


def test_quantize_reads_and_writes_the_registry(settings, oci_registry, model_bytes, tmp_path) -> None:
    """EVC's int8 variant with the OCI backend: a worker of its own (Redis database 14) pulls
    the parent and the evaluation set from the registry and pushes the variant there."""
    import numpy as np
    from evc.api.app import create_app

    from evc.fl.data import load_reference_digits
    from tests.fixtures.services import API, Worker, own_database

    s, st = own_database(
        settings, 14, "ocimodels", model_storage="oci", model_registry_url=oci_registry.url,
        model_registry_insecure=True, model_registry_repository="evc-test/quantize",
    )  # fmt: skip
    w = Worker(s, tmp_path / "worker.log", concurrency=1, queues="default").start()
    try:
        a = API(create_app(s), st, s)
        name = unique()
        status, rec = upload(a, model_bytes, {"name": name, "version": "1"})
        assert status == 201 and rec["storage"]["backend"] == "oci", rec
        d = load_reference_digits()
        buf = io.BytesIO()
        np.savez(buf, X=d.X_test.astype(np.float32), y=d.y_test.astype(np.int64))
        form = {"eval_set": (io.BytesIO(buf.getvalue()), "eval.npz"), "dataset": "digits-test"}
        status, job = a.call(
            "POST", f"/api/v1/models/{name}/versions/1/quantize", data=form, content_type="multipart/form-data"
        )
        assert status == 202, job
        job = a.wait_job(job["id"], timeout=120)
        assert job["state"] == "succeeded", job
        status, v = a.call("GET", f"/api/v1/models/{name}/versions/1")
        (int8,) = v["variants"]
        assert int8["variant"] == "int8" and int8["storage"]["backend"] == "oci"
        assert int8["evaluation"]["samples"] == len(d.y_test)
        assert manifest(oci_registry, int8["storage"]["ref"]).json()["annotations"][oci.ANNOTATION_VARIANT] == "int8"
        assert not (s.data_dir / "models" / "blobs" / "sha256" / int8["sha256"]).exists()
    finally:
        w.stop()
