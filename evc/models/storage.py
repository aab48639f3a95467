"""Where model files live: the storage backends of the model registry.

Every backend stages an upload in the data directory first (``<data_dir>/models/tmp``: hashed
while copied, read there for its metadata), then :meth:`ModelStorage.commit` keeps it:

- ``embedded`` (the default, :class:`EmbeddedStorage`): content-addressed files under
  ``<data_dir>/models/blobs/sha256/<hex>`` (:mod:`evc.models.blobs`);
- ``oci`` (:class:`OCIStorage`): one OCI artifact per version or variant in the registry of the
  settings ``model_registry_*`` (:mod:`evc.models.oci`): repository
  ``<model_registry_repository>/<name>``, tag ``<version>`` (a variant: ``<version>.variant.<variant>``),
  evaluation sets in ``<model_registry_repository>/eval-sets``.

A blob is known by its SHA-256 and the reference that uses it (``name:version[:variant]`` or
``eval-set``, as in :mod:`evc.store.models`); what a backend kept is described by the record's
``storage`` field (:meth:`ModelStorage.commit`'s answer). :meth:`ModelStorage.fetch` answers a
local file verified against the digest (a temporary copy for ``oci``: ``Blob.temporary``).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Protocol

from evc.errors import ConfigError
from evc.model import JSON
from evc.models import oci
from evc.models.blobs import Blob, BlobCorrupt, BlobStore, Staged, blob_lock, release
from evc.settings import Settings

EVAL_SETS = "eval-set"


class ModelStorage(Protocol):
    backend: str
    blobs: BlobStore  # the staging area (and, embedded, the blobs)

    def stage(self, stream: IO[bytes], limit: int | None = None) -> Staged: ...

    def commit(self, staged: Staged, store: Any, ref: str, annotations: dict[str, str]) -> JSON:
        """Keep *staged* for *ref* (referenced in *store*); what the record's ``storage`` says."""
        ...

    def exists(self, digest: str, ref: str) -> bool: ...

    def fetch(self, digest: str, ref: str, location: JSON | None = None) -> Blob:
        """A local file holding the blob, verified (:class:`BlobCorrupt` when it changed);
        *location*: the record's ``storage``, where it was kept."""
        ...

    def read_verified(self, digest: str, ref: str, location: JSON | None = None) -> bytes: ...

    def release(self, store: Any, digest: str, ref: str, location: JSON | None) -> bool:
        """*ref* no longer uses the blob: drop what was kept for it."""
        ...


class EmbeddedStorage:
    backend = "embedded"

    def __init__(self, settings: Settings) -> None:
        self.blobs = BlobStore.of(settings.data_dir)

    def stage(self, stream: IO[bytes], limit: int | None = None) -> Staged:
        return self.blobs.stage(stream, limit)

    def commit(self, staged: Staged, store: Any, ref: str, annotations: dict[str, str]) -> JSON:
        staged.commit(store, ref)
        return {"backend": self.backend}

    def exists(self, digest: str, ref: str) -> bool:
        return self.blobs.exists(digest)

    def fetch(self, digest: str, ref: str, location: JSON | None = None) -> Blob:
        return self.blobs.verify(digest)

    def read_verified(self, digest: str, ref: str, location: JSON | None = None) -> bytes:
        return self.blobs.read_verified(digest)

    def release(self, store: Any, digest: str, ref: str, location: JSON | None) -> bool:
        return release(store, self.blobs, digest, ref)


class OCIStorage:
    """Model files as OCI artifacts in the registry the settings name."""

    backend = "oci"

    def __init__(self, settings: Settings) -> None:
        if not settings.model_registry_url:
            raise ConfigError("model_storage is oci: set model_registry_url (e.g. https://registry.example:5000)")
        self.blobs = BlobStore.of(settings.data_dir)
        self.prefix = settings.model_registry_repository.strip("/")
        self.registry = registry_for(settings, settings.model_registry_url)

    def repo_tag(self, ref: str) -> tuple[str, str]:
        if ref == EVAL_SETS:
            return f"{self.prefix}/eval-sets", ""
        name, version, *variant = ref.split(":")
        tag = version + (f".variant.{variant[0]}" if variant else "")
        return f"{self.prefix}/{oci.repository_component(name)}", tag

    def stage(self, stream: IO[bytes], limit: int | None = None) -> Staged:
        return self.blobs.stage(stream, limit)

    def commit(self, staged: Staged, store: Any, ref: str, annotations: dict[str, str]) -> JSON:
        repo, tag = self.repo_tag(ref)
        digest = f"sha256:{staged.digest}"
        with blob_lock(store, staged.digest):  # the references are kept as for embedded blobs
            store.ref_blob(staged.digest, ref)
        # the upload runs unlocked: a release deletes a record's manifest, never a shared blob
        with open(staged.tmp, "rb") as f:
            self.registry.push_blob(repo, digest, staged.size, f)
        self.registry.push_blob(repo, oci.EMPTY_DIGEST, len(oci.EMPTY_JSON), io.BytesIO(oci.EMPTY_JSON))
        fmt = annotations.get(oci.ANNOTATION_FORMAT, "onnx")
        title = ref.replace(":", "-") + (f".{fmt}" if fmt in ("onnx", "npz") else ".bin")
        notes = {**annotations, oci.ANNOTATION_SHA256: staged.digest}
        manifest = oci.artifact_manifest(digest, staged.size, fmt, title, notes)
        mdigest = self.registry.put_manifest(repo, tag or f"sha256-{staged.digest}", manifest)
        staged.discard()
        return {"backend": self.backend, "ref": f"{self.registry.host}/{repo}@{mdigest}"}

    def exists(self, digest: str, ref: str) -> bool:
        repo, _ = self.repo_tag(ref)
        return self.registry.has_blob(repo, f"sha256:{digest}")

    def _repo(self, ref: str, location: JSON | None) -> str:
        """The repository that holds *ref*'s blob: the one its record names (the prefix may
        have changed since), else where it would be written now."""
        pinned = str((location or {}).get("ref") or "")
        if "@" in pinned and "/" in pinned:
            return pinned.split("/", 1)[1].split("@", 1)[0]
        return self.repo_tag(ref)[0]

    def fetch(self, digest: str, ref: str, location: JSON | None = None) -> Blob:
        repo = self._repo(ref, location)
        self.blobs._ensure()
        tmp = self.blobs.tmp / f"pull-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                size = self.registry.pull_blob(repo, f"sha256:{digest}", out)
        except oci.DigestMismatch as exc:
            tmp.unlink(missing_ok=True)
            raise BlobCorrupt(
                f"stored blob sha256:{digest} is corrupt in the registry ({exc.message}); upload it again",
                sha256=digest,
            ) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Blob(digest, size, tmp, temporary=True)

    def read_verified(self, digest: str, ref: str, location: JSON | None = None) -> bytes:
        blob = self.fetch(digest, ref, location)
        try:
            return blob.path.read_bytes()
        finally:
            blob.path.unlink(missing_ok=True)

    def release(self, store: Any, digest: str, ref: str, location: JSON | None) -> bool:
        with blob_lock(store, digest):
            store.unref_blob(digest, ref)
            pinned = str((location or {}).get("ref") or "")
            if "@" not in pinned:
                return False
            # the registry's garbage collection frees the layer once no manifest uses it
            return self.registry.delete_manifest(self._repo(ref, location), pinned.rsplit("@", 1)[1])


def credentials(settings: Settings) -> tuple[str, str] | None:
    """(user, password) from ``<data_dir>/<model_registry_credentials>`` (JSON with
    ``username`` and ``password``), or None when that file does not exist."""
    path = Path(settings.model_registry_credentials)
    if not path.is_absolute():
        path = settings.data_dir / path
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the registry credentials in {path}: {exc}") from exc
    if not isinstance(doc, dict) or not doc.get("username"):
        raise ConfigError(f"{path} must hold a JSON object with username and password")
    return str(doc["username"]), str(doc.get("password", ""))


def may_pull_from(settings: Settings, host: str) -> bool:
    """Whether a version may be registered by reference from *host*: the configured registry,
    or one of ``model_registry_pull_hosts`` (``*``: any). EVC does not fetch from anywhere a
    caller names (a ``models`` token must not make it probe the network)."""
    configured = settings.model_registry_url.rstrip("/").split("://", 1)[-1]
    allowed = {h.strip() for h in settings.model_registry_pull_hosts.split(",") if h.strip()}
    return host == configured or "*" in allowed or host in allowed


def registry_for(settings: Settings, url_or_host: str) -> oci.Registry:
    """A client of the registry at *url_or_host*: the configured one (its scheme, credentials),
    or another named by a reference (https; http only on loopback with model_registry_insecure)."""
    configured = settings.model_registry_url.rstrip("/")
    host = configured.split("://", 1)[-1] if configured else ""
    target = url_or_host.rstrip("/")
    if "://" not in target and host and target == host:
        target = configured
    is_configured = bool(configured) and target == configured
    if "://" not in target:
        scheme = "http" if settings.model_registry_insecure and oci.is_loopback(target) else "https"
        target = f"{scheme}://{target}"
    return oci.Registry(
        target,
        auth=credentials(settings) if is_configured else None,
        insecure=settings.model_registry_insecure,
        timeout_s=settings.model_registry_timeout_s,
    )


def storage(settings: Settings) -> ModelStorage:
    """The backend the setting ``model_storage`` names."""
    if settings.model_storage == "embedded":
        return EmbeddedStorage(settings)
    if settings.model_storage == "oci":
        return OCIStorage(settings)
    raise ConfigError(f"model_storage must be embedded or oci, not {settings.model_storage!r}")
