"""An OCI distribution registry client for model artifacts (ORAS conventions), over plain HTTP.

A model version (or variant) is one OCI artifact: an image manifest with ``artifactType``
:data:`ARTIFACT_TYPE`, the empty config (``application/vnd.oci.empty.v1+json``, ``{}``), one
layer holding the model file (media type :func:`layer_media_type`, e.g.
``application/vnd.evc.model.layer.v1.onnx``, titled with a file name as ORAS does) and
annotations naming the model (:data:`ANNOTATION_NAME`, ... :data:`ANNOTATION_SHA256`).

The client speaks the OCI distribution API with ``requests`` (the ``oras`` Python package was
considered: its requests retry with sleeps of up to a minute, its upload reads a whole blob into
memory and its pull neither verifies digests nor streams). Every blob is verified by SHA-256
both ways: the registry checks what is pushed against the digest given with it, and what is
pulled is hashed here (:class:`DigestMismatch` otherwise). Authentication: none, HTTP basic, or
a bearer token from the registry's token service (``WWW-Authenticate: Bearer realm=...``) with
the credentials of :class:`Registry`'s *auth* (user, password).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin

import requests

from evc.errors import EVCError, NotFound, ValidationError

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
ARTIFACT_TYPE = "application/vnd.evc.model.v1"
LAYER_PREFIX = "application/vnd.evc.model.layer.v1."
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest()
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_NAME = "dev.evc.model.name"
ANNOTATION_VERSION = "dev.evc.model.version"
ANNOTATION_VARIANT = "dev.evc.model.variant"
ANNOTATION_SHA256 = "dev.evc.model.sha256"
ANNOTATION_FORMAT = "dev.evc.model.format"
CHUNK = 1024 * 1024
MAX_MANIFEST = 4 * 1024 * 1024  # what distribution registries accept

#: ``host[:port]/repo/path`` then ``:tag`` and/or ``@sha256:<hex>``
REF_RE = re.compile(
    r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?)/"
    r"(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


class RegistryUnavailable(EVCError):
    """The OCI registry could not be reached or answered with an error."""

    status = 502
    code = "registry_unavailable"
    retryable = True


class DigestMismatch(EVCError):
    """Bytes from the registry do not hash to the digest they were asked for by."""

    status = 502
    code = "digest_mismatch"


def layer_media_type(fmt: str) -> str:
    return LAYER_PREFIX + fmt


def format_of(media_type: str) -> str | None:
    return media_type[len(LAYER_PREFIX) :] if media_type.startswith(LAYER_PREFIX) else None


@dataclass(frozen=True)
class Ref:
    """A parsed artifact reference: registry host, repository, tag and/or digest."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @classmethod
    def parse(cls, text: str, field: str = "oci_ref") -> Ref:
        m = REF_RE.match(text.strip()) if isinstance(text, str) else None
        if not m or not (m["tag"] or m["digest"]):
            raise ValidationError(
                f"{text!r} is not an OCI reference: expected HOST[:PORT]/REPOSITORY:TAG or "
                "HOST[:PORT]/REPOSITORY@sha256:<64 hex>",
                field=field,
            )
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest when there is one, else the tag."""
        return self.digest or str(self.tag)

    def pinned(self, digest: str) -> str:
        """``host/repo@sha256:...``: the reference pinned to one manifest."""
        return f"{self.host}/{self.repo}@{digest}"

    def __str__(self) -> str:
        return (
            f"{self.host}/{self.repo}"
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class Manifest:
    """A manifest as pulled: its digest (verified), its bytes' JSON."""

    digest: str
    doc: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        layers = self.doc.get("layers")
        return layers if isinstance(layers, list) else []

    @property
    def annotations(self) -> dict[str, str]:
        a = self.doc.get("annotations")
        return a if isinstance(a, dict) else {}


class Registry:
    """One OCI registry at *url* (``https://host:port`` or, when *insecure*, ``http://``)."""

    def __init__(
        self, url: str, auth: tuple[str, str] | None = None, insecure: bool = False, timeout_s: float = 30.0
    ) -> None:
        url = url.rstrip("/")
        if "://" not in url:
            url = ("http://" if insecure else "https://") + url
        if url.startswith("http://") and not insecure:
            raise ValidationError(
                f"the registry {url} is plain HTTP: set model_registry_insecure to allow it", field="oci_ref"
            )
        self.url = url
        self.host = url.split("://", 1)[1]
        self.auth = auth
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self._token: dict[str, str] = {}  # scope -> bearer token

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, repo: str, push: bool = False, **kw: Any) -> requests.Response:
        url = path if path.startswith("http") else self.url + path
        scope = f"repository:{repo}:" + ("pull,push" if push else "pull")
        if push and method == "DELETE":
            scope += ",delete"
        headers = dict(kw.pop("headers", None) or {})
        kw.setdefault("timeout", self.timeout_s)
        try:
            if scope in self._token:
                headers["Authorization"] = f"Bearer {self._token[scope]}"
            resp = self.session.request(method, url, headers=headers, **kw)
            if resp.status_code == 401 and self._authenticate(resp, scope, headers):
                seek = getattr(kw.get("data"), "seek", None)
                if seek is not None:
                    seek(0)
                resp = self.session.request(method, url, headers=headers, **kw)
        except requests.RequestException as exc:
            raise RegistryUnavailable(f"the registry {self.host} cannot be reached: {exc}", registry=self.host) from exc
        if resp.status_code == 401:
            said = "refused the credentials" if self.auth else "wants credentials (none are configured)"
            raise RegistryUnavailable(f"the registry {self.host} {said} for {repo} (401)", registry=self.host)
        if resp.status_code >= 500 or resp.status_code in (403, 429):
            raise RegistryUnavailable(
                f"the registry {self.host} answered {method} {path.split('?')[0]} with {resp.status_code}: "
                f"{_errors(resp)}",
                registry=self.host,
            )
        return resp

    def _authenticate(self, resp: requests.Response, scope: str, headers: dict[str, str]) -> bool:
        challenge = resp.headers.get("WWW-Authenticate", "")
        if self.auth is None:
            return False
        if challenge.lower().startswith("basic"):
            import base64

            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
            return True
        if challenge.lower().startswith("bearer"):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            realm = params.pop("realm", "")
            if not realm:
                return False
            params["scope"] = scope
            r = self.session.get(realm, params=params, auth=self.auth, timeout=self.timeout_s)
            if r.status_code != 200:
                return False
            body = r.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                return False
            self._token[scope] = token
            headers["Authorization"] = f"Bearer {token}"
            return True
        return False

    # ------------------------------------------------------------------ manifests
    def manifest(self, ref: Ref) -> Manifest:
        """The manifest *ref* names, its digest verified (against the digest asked for, else the
        one the registry says)."""
        accept = ", ".join((MANIFEST_TYPE, DOCKER_MANIFEST_TYPE))
        r = self._request(
            "GET", f"/v2/{ref.repo}/manifests/{ref.reference}", ref.repo, headers={"Accept": accept}, stream=True
        )
        with r:
            if r.status_code == 404:
                raise NotFound(f"no artifact {ref} in the registry {self.host}", oci_ref=str(ref))
            if r.status_code != 200:
                raise RegistryUnavailable(f"the registry {self.host} answered {r.status_code} for {ref}: {_errors(r)}")
            content = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
        if len(content) > MAX_MANIFEST:
            raise ValidationError(f"the manifest of {ref} is larger than {MAX_MANIFEST} bytes", field="oci_ref")
        actual = "sha256:" + hashlib.sha256(content).hexdigest()
        expected = ref.digest or r.headers.get("Docker-Content-Digest") or actual
        if actual != expected:
            raise DigestMismatch(
                f"the manifest of {ref} hashes to {actual}, not {expected}: refused", oci_ref=str(ref), digest=actual
            )
        try:
            doc = json.loads(content)
        except ValueError as exc:
            raise ValidationError(f"{ref} is not an OCI manifest: {exc}", field="oci_ref") from exc
        if not isinstance(doc, dict) or doc.get("mediaType", MANIFEST_TYPE) not in (
            MANIFEST_TYPE,
            DOCKER_MANIFEST_TYPE,
        ):
            raise ValidationError(f"{ref} is not an OCI image manifest (an index or another type)", field="oci_ref")
        return Manifest(actual, doc)

    def put_manifest(self, repo: str, tag: str, doc: dict[str, Any]) -> str:
        """Push a manifest under *tag*; its digest (checked against what the registry says)."""
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        r = self._request(
            "PUT", f"/v2/{repo}/manifests/{tag}", repo, push=True, data=body,
            headers={"Content-Type": MANIFEST_TYPE},
        )  # fmt: skip
        if r.status_code not in (200, 201):
            raise RegistryUnavailable(f"the registry {self.host} refused the manifest for {repo}:{tag}: {_errors(r)}")
        said = r.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise DigestMismatch(f"the registry stored the manifest of {repo}:{tag} as {said}, not {digest}")
        return digest

    def delete_manifest(self, repo: str, digest: str) -> bool:
        r = self._request("DELETE", f"/v2/{repo}/manifests/{digest}", repo, push=True)
        if r.status_code in (200, 202):
            return True
        if r.status_code == 404:
            return False
        raise RegistryUnavailable(f"the registry {self.host} refused to delete {repo}@{digest}: {_errors(r)}")

    # ------------------------------------------------------------------ blobs
    def has_blob(self, repo: str, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        return r.status_code == 200

    def push_blob(self, repo: str, digest: str, size: int, stream: IO[bytes]) -> None:
        """Upload *size* bytes of *stream* as *digest* (monolithic; the registry verifies the
        digest and refuses other bytes). Nothing is sent when the repository has it."""
        if self.has_blob(repo, digest):
            return
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", repo, push=True)
        location = r.headers.get("Location")
        if r.status_code != 202 or not location:
            raise RegistryUnavailable(f"the registry {self.host} refused an upload to {repo}: {_errors(r)}")
        url = urljoin(self.url + "/", location)
        url += ("&" if "?" in url else "?") + f"digest={digest}"
        r = self._request(
            "PUT", url, repo, push=True, data=stream,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )  # fmt: skip
        if r.status_code == 400 and "DIGEST_INVALID" in r.text:
            raise DigestMismatch(f"the registry {self.host} found the upload to {repo} does not hash to {digest}")
        if r.status_code != 201:
            raise RegistryUnavailable(f"the registry {self.host} refused the blob {digest} in {repo}: {_errors(r)}")

    def pull_blob(self, repo: str, digest: str, out: IO[bytes], limit: int | None = None) -> int:
        """Write blob *digest* of *repo* to *out*, hashing it: :class:`DigestMismatch` when the
        bytes are not what the digest says (a tampered registry), :class:`NotFound` when the
        registry does not have it. Returns the size."""
        r = self._request("GET", f"/v2/{repo}/blobs/{digest}", repo, stream=True, allow_redirects=True)
        with r:
            if r.status_code == 404:
                raise NotFound(f"the blob {digest} is missing from {self.host}/{repo}", digest=digest)
            if r.status_code != 200:
                raise RegistryUnavailable(f"the registry {self.host} answered {r.status_code} for blob {digest}")
            h, size = hashlib.sha256(), 0
            for chunk in _iter(r):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise ValidationError(f"the blob {digest} in {self.host}/{repo} is larger than {limit} bytes")
                h.update(chunk)
                out.write(chunk)
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            raise DigestMismatch(
                f"the blob {digest} pulled from {self.host}/{repo} hashes to {actual}: it was tampered with or "
                "damaged in the registry; refused",
                digest=digest,
                actual=actual,
            )
        return size


def _iter(r: requests.Response) -> Iterator[bytes]:
    yield from (c for c in r.iter_content(CHUNK) if c)


def _errors(r: requests.Response) -> str:
    try:
        errs = r.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errs) or r.reason
    except ValueError:
        return (r.text or r.reason or "")[:200]


def artifact_manifest(
    layer_digest: str, size: int, fmt: str, title: str, annotations: dict[str, str]
) -> dict[str, Any]:
    """The ORAS-style manifest of one model file."""
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_JSON)},
        "layers": [
            {
                "mediaType": layer_media_type(fmt),
                "digest": layer_digest,
                "size": size,
                "annotations": {ANNOTATION_TITLE: title},
            }
        ],
        "annotations": annotations,
    }


def model_layer(m: Manifest, ref: Ref) -> dict[str, Any]:
    """The layer of *m* that holds the model: the only layer, or the one with an EVC model
    media type (or an ``.onnx`` title); :class:`ValidationError` otherwise."""
    layers = [x for x in m.layers if isinstance(x, dict) and str(x.get("digest", "")).startswith("sha256:")]
    if len(layers) > 1:
        layers = [
            x for x in layers
            if format_of(str(x.get("mediaType", "")))
            or str((x.get("annotations") or {}).get(ANNOTATION_TITLE, "")).endswith(".onnx")
        ]  # fmt: skip
    if len(layers) != 1:
        raise ValidationError(
            f"{ref} holds {len(m.layers)} layers and no single model layer (one layer, or one of media type "
            f"{LAYER_PREFIX}<format> or titled *.onnx)",
            field="oci_ref",
        )
    layer = layers[0]
    if not re.match(r"^sha256:[0-9a-f]{64}$", str(layer["digest"])):
        raise ValidationError(f"{ref}'s model layer has no SHA-256 digest", field="oci_ref")
    return layer


def repository_component(name: str) -> str:
    """A model name as a repository path component (lower case; names with upper-case letters
    get a short hash so that ``Digits`` and ``digits`` stay apart)."""
    if COMPONENT_RE.match(name):
        return name
    lowered = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
    return f"{lowered}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
