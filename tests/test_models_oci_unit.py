"""Unit tests of the OCI storage pieces that need no registry: references, repository names,
which registry and scheme a reference reaches, credentials, the backend choice, the model layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evc.errors import ConfigError, ValidationError
from evc.models import oci
from evc.models.storage import EmbeddedStorage, OCIStorage, credentials, may_pull_from, registry_for, storage
from evc.settings import load_settings

DIGEST = "sha256:" + "ab" * 32


def test_ref_parse_tag_digest_and_pinning() -> None:
    r = oci.Ref.parse("127.0.0.1:5000/team/digits:v1")
    assert (r.host, r.repo, r.tag, r.digest, r.reference) == ("127.0.0.1:5000", "team/digits", "v1", None, "v1")
    assert r.pinned(DIGEST) == f"127.0.0.1:5000/team/digits@{DIGEST}"
    d = oci.Ref.parse(f"registry.example/digits@{DIGEST}")
    assert d.tag is None and d.reference == DIGEST and str(d) == f"registry.example/digits@{DIGEST}"
    both = oci.Ref.parse(f"localhost:5000/a/b:v2@{DIGEST}")
    assert both.reference == DIGEST and both.tag == "v2"
    for bad in ("digits:v1", "host/Upper:v1", "host/repo", "host/repo@sha256:short", "", "host/repo:bad tag"):
        with pytest.raises(ValidationError, match="not an OCI reference"):
            oci.Ref.parse(bad)


def test_repository_component_keeps_names_apart() -> None:
    assert oci.repository_component("digits") == "digits"
    assert oci.repository_component("digits-v2.small") == "digits-v2.small"
    upper = oci.repository_component("Digits")
    assert upper.startswith("digits-") and upper != oci.repository_component("DIGITS")
    assert oci.COMPONENT_RE.match(upper) and oci.COMPONENT_RE.match(oci.repository_component("a__b..c"))


def test_loopback() -> None:
    assert oci.is_loopback("127.0.0.1:5000") and oci.is_loopback("localhost") and oci.is_loopback("[::1]:5000")
    assert not oci.is_loopback("registry.example:5000") and not oci.is_loopback("10.0.0.1")


def test_registry_for_scheme_and_credentials(tmp_path: Path) -> None:
    s = load_settings(
        env={}, data_dir=tmp_path, model_registry_url="http://127.0.0.1:5000", model_registry_insecure=True
    )
    (tmp_path / "model-registry.json").write_text(json.dumps({"username": "evc", "password": "pw"}))
    configured = registry_for(s, "127.0.0.1:5000")
    assert configured.url == "http://127.0.0.1:5000" and configured.auth == ("evc", "pw")
    other = registry_for(s, "registry.example:5000")  # never plain HTTP off loopback; not our credentials
    assert other.url == "https://registry.example:5000" and other.auth is None
    assert registry_for(s, "localhost:6000").url == "http://localhost:6000"
    strict = s.replace(model_registry_insecure=False)
    with pytest.raises(ValidationError, match="model_registry_insecure"):
        registry_for(strict, "127.0.0.1:5000")
    assert registry_for(strict, "127.0.0.2:5000").url == "https://127.0.0.2:5000"


def test_pull_hosts(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path)
    assert not may_pull_from(s, "127.0.0.1:5000")  # no registry configured: nowhere
    s = s.replace(model_registry_url="https://reg.example:5000", model_registry_pull_hosts="a:1, b:2")
    assert may_pull_from(s, "reg.example:5000") and may_pull_from(s, "b:2") and not may_pull_from(s, "c:3")
    assert may_pull_from(s.replace(model_registry_pull_hosts="*"), "c:3")


def test_credentials_file(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path)
    assert credentials(s) is None
    (tmp_path / "model-registry.json").write_text("not json")
    with pytest.raises(ConfigError, match="registry credentials"):
        credentials(s)
    abs_file = tmp_path / "elsewhere.json"
    abs_file.write_text(json.dumps({"username": "u"}))
    assert credentials(s.replace(model_registry_credentials=str(abs_file))) == ("u", "")


def test_backend_choice(tmp_path: Path) -> None:
    s = load_settings(env={}, data_dir=tmp_path)
    assert isinstance(storage(s), EmbeddedStorage)
    with pytest.raises(ConfigError, match="model_registry_url"):
        storage(s.replace(model_storage="oci"))
    with pytest.raises(ConfigError, match="embedded or oci"):
        storage(s.replace(model_storage="s3"))
    st = storage(
        s.replace(model_storage="oci", model_registry_url="https://reg.example", model_registry_repository="/x/y/")
    )
    assert isinstance(st, OCIStorage)
    assert st.repo_tag("digits:1.0") == ("x/y/digits", "1.0")
    assert st.repo_tag("Digits:1.0:int8")[1] == "1.0.variant.int8"
    assert st.repo_tag("eval-set") == ("x/y/eval-sets", "")


def _manifest(*layers: dict[str, object]) -> oci.Manifest:
    return oci.Manifest(DIGEST, {"schemaVersion": 2, "layers": list(layers)})


def test_model_layer_choice() -> None:
    ref = oci.Ref.parse("h/r:t")
    one = {"mediaType": "application/octet-stream", "digest": DIGEST, "size": 1}
    assert oci.model_layer(_manifest(one), ref) is one
    evc_layer = {**one, "mediaType": oci.layer_media_type("onnx")}
    titled = {**one, "annotations": {oci.ANNOTATION_TITLE: "model.onnx"}}
    assert oci.model_layer(_manifest(one, evc_layer), ref) is evc_layer
    assert oci.model_layer(_manifest(one, titled), ref) is titled
    with pytest.raises(ValidationError, match="no single model layer"):
        oci.model_layer(_manifest(one, one), ref)
    with pytest.raises(ValidationError, match="no single model layer"):
        oci.model_layer(_manifest(), ref)
    assert oci.format_of(oci.layer_media_type("tflite")) == "tflite" and oci.format_of("text/plain") is None


def test_artifact_manifest_shape() -> None:
    m = oci.artifact_manifest(DIGEST, 3, "onnx", "d-1.onnx", {oci.ANNOTATION_NAME: "d"})
    assert m["artifactType"] == oci.ARTIFACT_TYPE and m["config"]["digest"] == oci.EMPTY_DIGEST
    assert m["layers"][0]["mediaType"] == "application/vnd.evc.model.layer.v1.onnx"
    assert m["layers"][0]["annotations"] == {oci.ANNOTATION_TITLE: "d-1.onnx"}


def test_unreachable_registry_is_a_clear_502() -> None:
    from evc.embedded import free_port

    reg = oci.Registry(f"http://127.0.0.1:{free_port()}", insecure=True, timeout_s=2)
    with pytest.raises(oci.RegistryUnavailable, match="cannot be reached") as exc:
        reg.manifest(oci.Ref.parse("127.0.0.1:1/r:t"))
    assert exc.value.status == 502


def test_the_backend_of_a_record(tmp_path: Path) -> None:
    from evc.models import registry

    s = load_settings(env={}, data_dir=tmp_path, model_storage="oci", model_registry_url="https://reg.example")
    assert isinstance(registry.storage(s), OCIStorage)
    # records from before the backends, and embedded ones, stay in the data directory
    assert isinstance(registry.storage(s, {"name": "d", "version": "1"}), EmbeddedStorage)
    assert isinstance(registry.storage(s, {"storage": {"backend": "embedded"}}), EmbeddedStorage)
    oci_rec = {"storage": {"backend": "oci", "ref": f"reg.example/old/prefix/d@{DIGEST}"}}
    st = registry.storage(s.replace(model_storage="embedded"), oci_rec)
    assert isinstance(st, OCIStorage) and st._repo("d:1", oci_rec["storage"]) == "old/prefix/d"
    assert registry.record_ref({"name": "d", "version": "1", "variant": "int8"}) == "d:1:int8"
