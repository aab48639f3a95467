"""The model registry: versions registered by upload, their variants, list/show/download/delete.

A version (``name`` + ``version``) is content-addressed by the SHA-256 of its bytes and
immutable: registering it again with the same bytes answers the stored record (idempotent),
with other bytes a :class:`~evc.errors.Conflict`. A version may also be registered by
reference to an OCI artifact (:func:`register_reference`): pulled once, verified, pinned by
digest. A variant (``fp32``, ``int8``, ...) of a version is registered the same way and records
its parent's digest. Files live in the storage backend the settings choose
(:mod:`evc.models.storage`: embedded, or an OCI registry; a record's ``storage`` says which);
records in the store (:mod:`evc.store.models`); every change is audited.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import IO, Any

from evc.context import Context
from evc.errors import Conflict, NotFound, ValidationError
from evc.model import JSON
from evc.models import metadata as graph_meta
from evc.models import oci
from evc.models.blobs import Staged
from evc.models.storage import EmbeddedStorage, ModelStorage, OCIStorage, may_pull_from, registry_for
from evc.models.storage import storage as _storage
from evc.store import Store, now

#: a model name or version: never ``:`` (record keys and ``NAME:VERSION`` references use it)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: a variant's name: ``fp32``, ``int8``, ``w0.5`` ...
VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
#: the format field is open; ONNX graphs are read for their metadata
FORMAT_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,31}$")
#: what a record takes from its registration's metadata (``evaluation``: EVC's own measurement)
UPLOADER_FIELDS = ("task", "labels", "accuracy", "license", "format", "description", "evaluation")
#: a blob reference that keeps evaluation sets for reuse (``evc model quantize --eval-set``)
EVAL_SETS = "eval-set"
#: where records from before the storage backends were kept
EMBEDDED: JSON = {"backend": "embedded"}


def storage(ctx_or_settings: Any, rec: JSON | None = None) -> ModelStorage:
    """The storage backend of the settings, or the one that keeps *rec*'s file (records from
    before a change of ``model_storage`` stay where they were written)."""
    settings = getattr(ctx_or_settings, "settings", ctx_or_settings)
    if rec is None:
        return _storage(settings)
    backend = (rec.get("storage") or EMBEDDED).get("backend")
    return OCIStorage(settings) if backend == "oci" else EmbeddedStorage(settings)


def record_ref(rec: JSON) -> str:
    """The blob reference of a version or variant record: ``name:version[:variant]``."""
    return f"{rec['name']}:{rec['version']}" + (f":{rec['variant']}" if rec.get("variant") else "")


def _annotations(name: str, version: str, variant: str | None, fmt: str) -> dict[str, str]:
    notes = {oci.ANNOTATION_NAME: name, oci.ANNOTATION_VERSION: version, oci.ANNOTATION_FORMAT: fmt}
    if variant:
        notes[oci.ANNOTATION_VARIANT] = variant
    return notes


def deployed(store: Store, name: str, version: str) -> bool:
    """Whether a deployment runs this version or one of its variants (a deleted version could
    no longer be shipped): answered from the store's deployments part (a deployment counts
    until its removal job has cleaned its devices); :func:`delete` asks."""
    return bool(store.model_deployments(name, version))


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValidationError(
            f"{what} must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", field=what
        )
    return value


def check_variant(value: str) -> str:
    if not isinstance(value, str) or not VARIANT_RE.match(value):
        raise ValidationError(
            "variant must be 1-32 lower-case letters, digits, '.', '_' or '-' (e.g. int8)", field="variant"
        )
    return value


def _uploader(meta: JSON) -> JSON:
    out = {k: meta[k] for k in UPLOADER_FIELDS if meta.get(k) is not None}
    out.setdefault("format", "onnx")
    out.setdefault("labels", {})
    if not FORMAT_RE.match(str(out["format"])):
        raise ValidationError("format must be 1-32 lower-case letters, digits, '.', '_', '+' or '-'", field="format")
    return out


def _graph_metadata(fmt: str, path: Path) -> JSON | None:
    """What EVC reads from the file itself (ONNX only; other formats: None)."""
    if fmt != "onnx":
        return None
    return graph_meta.extract(path.read_bytes())


# ----------------------------------------------------------------------------- register
def register(ctx: Context, stream: IO[bytes], meta: JSON) -> tuple[JSON, bool]:
    """Register version ``meta["name"]``/``meta["version"]`` with the bytes of *stream*.

    Returns (record, created): the same bytes again answer the stored record (created False);
    other bytes under a registered name and version are a :class:`Conflict`."""
    name, version = check_name(meta.get("name", ""), "name"), check_name(meta.get("version", ""), "version")
    up = _uploader(meta)
    st = storage(ctx)
    staged = st.stage(stream, ctx.settings.model_max_upload_bytes)
    return _register_staged(ctx, st, staged, name, version, up, {})


def _register_staged(
    ctx: Context, st: ModelStorage, staged: Staged, name: str, version: str, up: JSON, extra: JSON
) -> tuple[JSON, bool]:
    ref = f"{name}:{version}"
    try:
        existing = ctx.store.get_model_version(name, version)
        if existing is not None:
            return _same_bytes(existing, staged.digest, f"model {name}:{version}"), False
        graph = _graph_metadata(up["format"], staged.tmp)
        digest, size = staged.digest, staged.size
        location = st.commit(staged, ctx.store, ref, _annotations(name, version, None, up["format"]))
    finally:
        staged.discard()
    rec: JSON = {
        "name": name, "version": version, "sha256": digest, "size": size, **up, **extra,
        "storage": location, "metadata": graph, "created_at": now(), "created_by": ctx.actor,
    }  # fmt: skip
    stored, created = ctx.store.create_model_version(rec)
    if not created:  # another upload of this name and version won the race
        if stored["sha256"] != digest or stored.get("storage", EMBEDDED) != location:
            st.release(ctx.store, digest, ref, location)
        return _same_bytes(stored, digest, f"model {name}:{version}"), False
    ctx.store.audit(ctx.actor, "model.register", ref, sha256=digest, size=size, **extra)
    return stored, True


def _resolve(ctx: Context, oci_ref: str) -> tuple[Any, oci.Ref, Any, str]:
    """The registry, reference, manifest and digest-pinned reference of *oci_ref* (only from
    the registries EVC may pull from)."""
    ref = oci.Ref.parse(oci_ref)
    if not may_pull_from(ctx.settings, ref.host):
        raise ValidationError(
            f"EVC does not pull from {ref.host}: it may pull from the registry of model_registry_url and those "
            "of model_registry_pull_hosts",
            field="oci_ref",
        )
    reg = registry_for(ctx.settings, ref.host)
    try:
        manifest = reg.manifest(ref)
    except NotFound as exc:
        raise ValidationError(exc.message, field="oci_ref") from exc
    return reg, ref, manifest, ref.pinned(manifest.digest)


def _pull(ctx: Context, reg: Any, ref: oci.Ref, manifest: Any, meta: JSON) -> tuple[ModelStorage, Staged, JSON]:
    """Pull the model layer of *manifest* into the blob store's temporary area, verified by
    digest: (storage, the staged file, the uploader's metadata with the layer's format)."""
    layer = oci.model_layer(manifest, ref)
    layer_format = oci.format_of(str(layer.get("mediaType", "")))  # EVC's own artifacts say it
    up = _uploader({**meta, **({"format": layer_format} if layer_format else {})})
    st = storage(ctx)
    bs = st.blobs
    bs._ensure()
    tmp = bs.tmp / f"pull-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        with open(tmp, "xb") as out:
            size = reg.pull_blob(ref.repo, str(layer["digest"]), out, ctx.settings.model_max_upload_bytes)
    except NotFound as exc:
        tmp.unlink(missing_ok=True)
        raise ValidationError(f"{exc.message}: cannot register {ref}", field="oci_ref") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return st, Staged.adopt(bs, tmp, str(layer["digest"]).removeprefix("sha256:"), size), up


def register_reference(ctx: Context, meta: JSON) -> tuple[JSON, bool]:
    """Register version ``meta["name"]``/``meta["version"]`` from the OCI artifact
    ``meta["oci_ref"]`` (``host:port/repo:tag`` or ``...@sha256:...``): its manifest and model
    layer are pulled once and verified by digest, kept like an upload, and the record's
    ``oci_ref`` is pinned to the manifest's digest. The same artifact again answers the stored
    record (nothing pulled)."""
    name, version = check_name(meta.get("name", ""), "name"), check_name(meta.get("version", ""), "version")
    reg, ref, manifest, pinned = _resolve(ctx, meta.get("oci_ref", ""))
    existing = ctx.store.get_model_version(name, version)
    if existing is not None and existing.get("oci_ref") == pinned:
        return existing, False
    st, staged, up = _pull(ctx, reg, ref, manifest, meta)
    return _register_staged(ctx, st, staged, name, version, up, {"oci_ref": pinned})


def register_variant_reference(ctx: Context, name: str, version: str, variant: str, meta: JSON) -> tuple[JSON, bool]:
    """Register *variant* of *name*:*version* from the OCI artifact ``meta["oci_ref"]``, as
    :func:`register_reference` does a version (pulled once, verified, pinned by digest)."""
    check_variant(variant)
    get_version(ctx.store, name, version)
    reg, ref, manifest, pinned = _resolve(ctx, meta.get("oci_ref", ""))
    existing = ctx.store.get_model_variant(name, version, variant)
    if existing is not None and existing.get("oci_ref") == pinned:
        return existing, False
    st, staged, up = _pull(ctx, reg, ref, manifest, {k: v for k, v in meta.items() if k != "oci_ref"})
    return _register_variant_staged(ctx, st, staged, (name, version, variant), up, "oci", {"oci_ref": pinned})


def register_variant(
    ctx: Context, name: str, version: str, variant: str, stream: IO[bytes], meta: JSON, source: str = "upload"
) -> tuple[JSON, bool]:
    """Register *variant* of version *name*:*version* (which must exist) from *stream*;
    idempotent and immutable as :func:`register`. *source*: ``upload`` or what EVC made it with."""
    check_variant(variant)
    get_version(ctx.store, name, version)
    up = _uploader(meta)
    st = storage(ctx)
    staged = st.stage(stream, ctx.settings.model_max_upload_bytes)
    return _register_variant_staged(ctx, st, staged, (name, version, variant), up, source, {})


def _register_variant_staged(
    ctx: Context, st: ModelStorage, staged: Staged, key: tuple[str, str, str], up: JSON, source: str, extra: JSON
) -> tuple[JSON, bool]:
    name, version, variant = key
    parent = get_version(ctx.store, name, version)
    what = f"variant {variant} of {name}:{version}"
    ref = f"{name}:{version}:{variant}"
    try:
        existing = ctx.store.get_model_variant(name, version, variant)
        if existing is not None:
            return _same_bytes(existing, staged.digest, what), False
        graph = _graph_metadata(up["format"], staged.tmp)
        digest, size = staged.digest, staged.size
        location = st.commit(staged, ctx.store, ref, _annotations(name, version, variant, up["format"]))
    finally:
        staged.discard()
    rec: JSON = {
        "name": name, "version": version, "variant": variant, "sha256": digest, "size": size, **up,
        "parent": {"name": name, "version": version, "sha256": parent["sha256"]}, "storage": location,
        "source": source, "metadata": graph, "created_at": now(), "created_by": ctx.actor, **extra,
    }  # fmt: skip
    stored, created = ctx.store.create_model_variant(rec)
    if not created:
        if stored["sha256"] != digest or stored.get("storage", EMBEDDED) != location:
            st.release(ctx.store, digest, ref, location)
        return _same_bytes(stored, digest, what), False
    if ctx.store.get_model_version(name, version) is None:  # the parent was deleted meanwhile
        ctx.store.delete_model_variant(name, version, variant)
        st.release(ctx.store, digest, ref, location)
        raise NotFound(f"model {name}:{version} was deleted", name=name, version=version)
    ctx.store.audit(ctx.actor, "model.variant", ref, sha256=digest, size=size, source=source)
    return stored, True


def _same_bytes(existing: JSON, digest: str, what: str) -> JSON:
    if existing["sha256"] != digest:
        raise Conflict(
            f"{what} is registered with other bytes (sha256:{existing['sha256']}); versions are immutable: "
            "register a new version",
            sha256=existing["sha256"],
        )
    return existing


def store_eval_set(ctx: Context, stream: IO[bytes], dataset: str | None = None) -> str:
    """Keep an evaluation set (an ``.npz`` with ``X`` and ``y``) as a blob and record it (listed
    and deleted through :mod:`evc.models.eval_sets`); returns its digest."""
    from evc.models.quantize import load_eval_set

    st = storage(ctx)
    staged = st.stage(stream, ctx.settings.model_max_upload_bytes)
    try:
        x, _ = load_eval_set(staged.tmp.read_bytes())  # refuse what the job could not read, now
        digest, size = staged.digest, staged.size
        location = st.commit(staged, ctx.store, EVAL_SETS, {oci.ANNOTATION_FORMAT: "npz"})
    finally:
        staged.discard()
    if ctx.store.get_eval_set(digest) is None:
        ctx.store.put_eval_set({"sha256": digest, "size": size, "samples": int(len(x)), "dataset": dataset,
                                "storage": location, "created_at": now(), "created_by": ctx.actor})  # fmt: skip
    return digest


# ----------------------------------------------------------------------------- read
def get_version(store: Store, name: str, version: str) -> JSON:
    rec = store.get_model_version(name, version) if NAME_RE.match(name) and NAME_RE.match(version) else None
    if rec is None:
        raise NotFound(f"model {name}:{version} not found", name=name, version=version)
    return rec


def get_variant(store: Store, name: str, version: str, variant: str) -> JSON:
    get_version(store, name, version)
    rec = store.get_model_variant(name, version, variant) if VARIANT_RE.match(variant) else None
    if rec is None:
        raise NotFound(f"model {name}:{version} has no variant {variant!r}", variant=variant)
    return rec


def version_view(store: Store, rec: JSON) -> JSON:
    """A version as the API shows it: with its variants and whether it is deployed."""
    return {
        **rec,
        "digest": f"sha256:{rec['sha256']}",
        "variants": [
            {**v, "digest": f"sha256:{v['sha256']}"} for v in store.model_variants(rec["name"], rec["version"])
        ],
        "deployed": deployed(store, rec["name"], rec["version"]),
    }


def model_view(name: str, versions: list[JSON]) -> JSON:
    latest = versions[-1] if versions else {}
    return {
        "name": name,
        "task": latest.get("task"),
        "latest": latest.get("version"),
        "versions": [
            {k: v.get(k) for k in ("version", "sha256", "size", "format", "task", "created_at")} for v in versions
        ],
        "created_at": versions[0]["created_at"] if versions else None,
    }


def show(store: Store, name: str) -> JSON:
    versions = store.model_versions(name) if NAME_RE.match(name) else []
    if not versions:
        raise NotFound(f"model {name} not found", name=name)
    return model_view(name, versions)


def list_models(
    store: Store,
    offset: int = 0,
    limit: int = 50,
    *,
    task: str | None = None,
    label: dict[str, str] | None = None,
    fmt: str | None = None,
    name_prefix: str | None = None,
) -> tuple[list[JSON], int]:
    """Models (oldest first) with at least one version that matches every filter given; their
    versions are those that match. Returns one page and the total."""

    def match(v: JSON) -> bool:
        return (
            (task is None or v.get("task") == task)
            and (fmt is None or v.get("format") == fmt)
            and all((v.get("labels") or {}).get(k) == val for k, val in (label or {}).items())
        )

    names, total = store.model_names()
    if name_prefix:
        names = [n for n in names if n.startswith(name_prefix)]
    filtered = task is not None or fmt is not None or bool(label)
    if not filtered:
        return [model_view(n, store.model_versions(n)) for n in names[offset : offset + limit]], len(names)
    items: list[JSON] = []
    total = 0
    for n in names:
        versions = [v for v in store.model_versions(n) if match(v)]
        if versions:
            if offset <= total < offset + limit:
                items.append(model_view(n, versions))
            total += 1
    return items, total


# ----------------------------------------------------------------------------- delete
def delete(ctx: Context, name: str, version: str) -> JSON:
    """Delete a version, its variants and the blobs nothing else uses; refused (409) while the
    version is deployed."""
    rec = get_version(ctx.store, name, version)
    if deployed(ctx.store, name, version):
        raise Conflict(f"model {name}:{version} is deployed; remove its deployments first", name=name)
    view = version_view(ctx.store, rec)
    removed = ctx.store.delete_model_version(name, version)
    for r in removed:
        storage(ctx, r).release(ctx.store, r["sha256"], record_ref(r), r.get("storage"))
    ctx.store.audit(ctx.actor, "model.delete", f"{name}:{version}", sha256=rec["sha256"], variants=len(removed) - 1)
    return view


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[:VERSION]`` -> (name, version or None)."""
    name, sep, version = ref.partition(":")
    check_name(name)
    if sep:
        check_name(version, "version")
        return name, version
    return name, None
