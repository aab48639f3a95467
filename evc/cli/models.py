"""`evc model`: the model registry (push, list, show, variant, quantize, rm)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from evc.cli.common import Ctx, _labels, _table, _watch, console, emit, main, pass_ctx

#: uploads may be large: the API's answer may take this long
UPLOAD_TIMEOUT_S = 900.0


@main.group()
def model() -> None:
    """The model registry: versions, variants, EVC's int8 quantization."""


def _ref(ref: str, need_version: bool = True) -> tuple[str, str | None]:
    name, sep, version = ref.partition(":")
    if not name or (sep and not version) or (need_version and not version):
        raise click.BadParameter(f"{ref!r}: expected NAME:VERSION" if need_version else f"{ref!r}: NAME[:VERSION]")
    return name, version or None


def _accuracy(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    dataset, sep, number = value.rpartition("=")
    try:
        return {"dataset": dataset, "value": float(number)} if sep and dataset else None
    except ValueError:
        pass
    raise click.BadParameter(f"{value!r} must be DATASET=VALUE, e.g. digits-test=0.95", param_hint="--accuracy")


def _upload(c: Ctx, path: str, file: Path, meta: dict[str, Any], field: str = "file") -> tuple[Any, int]:
    """POST *file* and *meta* as multipart; (the answer, its HTTP status)."""
    statuses: list[int] = []
    with open(file, "rb") as f:
        data = c.client().request(
            "POST", path, files={field: (file.name, f, "application/octet-stream")},
            data={"metadata": json.dumps({k: v for k, v in meta.items() if v is not None})},
            timeout=UPLOAD_TIMEOUT_S, hooks={"response": lambda r, *a, **k: statuses.append(r.status_code)},
        )  # fmt: skip
    return data, statuses[-1] if statuses else 0


def _uploader_options(fn: Any) -> Any:
    for opt in reversed(
        [
            click.option("--task", default=None, help="e.g. classification"),
            click.option("--label", "labels", multiple=True, help="key=value (repeatable)"),
            click.option("--accuracy", default=None, help="DATASET=VALUE, e.g. digits-test=0.95"),
            click.option("--license", "license_", default=None),
            click.option("--format", "fmt", default=None, help="onnx (default) or another format"),
        ]
    ):
        fn = opt(fn)
    return fn


def _meta(
    task: str | None, labels: tuple[str, ...], accuracy: str | None, license_: str | None, fmt: str | None
) -> dict[str, Any]:
    return {"task": task, "labels": _labels(labels) or None, "accuracy": _accuracy(accuracy), "license": license_,
            "format": fmt}  # fmt: skip


def _said(kind: str, d: dict[str, Any], status: int) -> None:
    what = "already registered (same bytes)" if status == 200 else "registered"
    console.print(f"{kind} {what}: sha256:{d['sha256']} ({d['size']} bytes)")


@model.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--name", required=True)
@click.option("--version", "version", required=True)
@click.option(
    "--oci-ref", default=None, help="register by reference: HOST[:PORT]/REPO:TAG or REPO@sha256:... (no FILE)"
)
@_uploader_options
@pass_ctx
def model_push(c: Ctx, file: Path | None, name: str, version: str, oci_ref: str | None, **opts: Any) -> None:
    """Register FILE (or the OCI artifact --oci-ref) as version VERSION of model NAME
    (immutable: the same bytes again are fine)."""
    meta = {"name": name, "version": version, **_meta(**opts)}
    if (file is None) == (oci_ref is None):
        raise click.UsageError("give either FILE or --oci-ref")
    if oci_ref is not None:
        statuses: list[int] = []
        body = {k: v for k, v in {**meta, "oci_ref": oci_ref}.items() if v is not None}
        d = c.client().request(
            "POST", "/api/v1/models", json=body, timeout=UPLOAD_TIMEOUT_S,
            hooks={"response": lambda r, *a, **k: statuses.append(r.status_code)},
        )  # fmt: skip
        status = statuses[-1] if statuses else 0

        def said(d: dict[str, Any]) -> None:
            _said(f"{d['name']}:{d['version']}", d, status)
            console.print(f"from {d['oci_ref']}")

        emit(c, d, said)
        return
    assert file is not None
    d, status = _upload(c, "/api/v1/models", file, meta)
    emit(c, d, lambda d: _said(f"{d['name']}:{d['version']}", d, status))


@model.command("list")
@click.option("--task", default=None)
@click.option("--label", "labels", multiple=True, help="key=value (repeatable)")
@pass_ctx
def model_list(c: Ctx, task: str | None, labels: tuple[str, ...]) -> None:
    """Models and their versions."""
    data = c.client().get("/api/v1/models", limit=500, task=task, label=list(labels) or None)
    rows = [{**m, "versions": ", ".join(v["version"] for v in m["versions"])} for m in data["items"]]
    emit(c, data, lambda d: _table(rows, ["name", "task", "latest", "versions"]))


def _show_version(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['name']}:{d['version']}[/bold]  {d['digest']}  {d['size']} bytes  {d.get('format')}")
    for k in ("task", "license", "accuracy", "labels", "oci_ref"):
        if d.get(k):
            console.print(f"  {k}: {d[k]}")
    md = d.get("metadata") or {}
    if md:
        for io_ in ("inputs", "outputs"):
            console.print(f"  {io_}: " + ", ".join(f"{t['name']} {t['type']} {t['shape']}" for t in md.get(io_, [])))
        console.print(f"  opset {md.get('opset')}, {md.get('parameters')} parameters, {md.get('nodes')} nodes, "
                      f"~{md.get('flops')} FLOPs per sample")  # fmt: skip
    if d.get("variants"):
        rows = [{**v, "accuracy": (v.get("accuracy") or {}).get("value")} for v in d["variants"]]
        _table(rows, ["variant", "sha256", "size", "format", "source", "accuracy"])


@model.command("show")
@click.argument("ref", metavar="NAME[:VERSION]")
@pass_ctx
def model_show(c: Ctx, ref: str) -> None:
    """A model's versions, or one version with its metadata and variants."""
    name, version = _ref(ref, need_version=False)
    if version is None:
        data = c.client().get(f"/api/v1/models/{name}")
        emit(c, data, lambda d: _table(d["versions"], ["version", "sha256", "size", "format", "task"]))
    else:
        emit(c, c.client().get(f"/api/v1/models/{name}/versions/{version}"), _show_version)


@model.command("variant")
@click.argument("ref", metavar="NAME:VERSION")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--variant", required=True, help="fp32, int8, ...")
@click.option(
    "--oci-ref", default=None, help="register by reference: HOST[:PORT]/REPO:TAG or REPO@sha256:... (no FILE)"
)
@_uploader_options
@pass_ctx
def model_variant(c: Ctx, ref: str, file: Path | None, variant: str, oci_ref: str | None, **opts: Any) -> None:
    """Register FILE (or the OCI artifact --oci-ref) as a variant of NAME:VERSION."""
    name, version = _ref(ref)
    if (file is None) == (oci_ref is None):
        raise click.UsageError("give either FILE or --oci-ref")
    path = f"/api/v1/models/{name}/versions/{version}/variants"
    meta = {"variant": variant, **_meta(**opts)}
    if oci_ref is not None:
        statuses: list[int] = []
        body = {k: v for k, v in {**meta, "oci_ref": oci_ref}.items() if v is not None}
        d = c.client().request("POST", path, json=body, timeout=UPLOAD_TIMEOUT_S,
                               hooks={"response": lambda r, *a, **k: statuses.append(r.status_code)})  # fmt: skip
        status = statuses[-1] if statuses else 0
    else:
        assert file is not None
        d, status = _upload(c, path, file, meta)
    emit(c, d, lambda d: _said(f"variant {variant} of {name}:{version}", d, status))


@model.command("eval-sets")
@click.option("--rm", "remove", default=None, metavar="SHA256", help="delete this evaluation set")
@pass_ctx
def model_eval_sets(c: Ctx, remove: str | None) -> None:
    """The evaluation sets kept for quantization (reuse one: POST .../quantize eval_set_sha256)."""
    client = c.client()
    if remove:
        d = client.delete(f"/api/v1/eval-sets/{remove.removeprefix('sha256:')}")
        emit(c, d, lambda d: console.print(f"deleted evaluation set sha256:{d['sha256']}"))
        return
    emit(c, client.get("/api/v1/eval-sets"), lambda d: _table(d["items"], ["sha256", "dataset", "samples", "size"]))


@model.command("quantize")
@click.argument("ref", metavar="NAME:VERSION")
@click.option("--eval-set", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=".npz holding X and y: measure top-1 of parent and variant")  # fmt: skip
@click.option("--dataset", default=None, help="the evaluation set's name")
@click.option("--wait", is_flag=True, help="follow the job")
@pass_ctx
def model_quantize(c: Ctx, ref: str, eval_set: Path | None, dataset: str | None, wait: bool) -> None:
    """EVC makes an int8 variant of NAME:VERSION (ONNX Runtime), optionally measured."""
    name, version = _ref(ref)
    client = c.client()
    path = f"/api/v1/models/{name}/versions/{version}/quantize"
    form = {"dataset": dataset or (eval_set.name if eval_set else None)}
    form = {k: v for k, v in form.items() if v}
    if eval_set:
        with open(eval_set, "rb") as f:
            job = client.request("POST", path, files={"eval_set": (eval_set.name, f)}, data=form,
                                 timeout=UPLOAD_TIMEOUT_S)  # fmt: skip
    else:
        job = client.request("POST", path, data=form)
    if not wait:
        emit(c, job, lambda d: console.print(f"{d['kind']} job {d['id']} {d['state']}"))
        return
    job = _watch(c, client, job["id"])
    full = client.get(f"/api/v1/jobs/{job['id']}")

    def show(j: dict[str, Any]) -> None:
        s = j.get("summary") or {}
        if s.get("sha256"):
            console.print(f"int8 variant of {name}:{version}: sha256:{s['sha256']} ({s['size']} bytes)")
        ev = s.get("evaluation")
        if ev:
            console.print(f"top-1 on {ev['dataset']} ({ev['samples']} samples): "
                          f"int8 {ev['variant']:.4f}, parent {ev['parent']:.4f}")  # fmt: skip

    emit(c, full, show)
    sys.exit(0 if full["state"] == "succeeded" else 1)


@model.command("rm")
@click.argument("ref", metavar="NAME:VERSION")
@pass_ctx
def model_rm(c: Ctx, ref: str) -> None:
    """Delete a version and its variants (refused while deployed)."""
    name, version = _ref(ref)
    d = c.client().delete(f"/api/v1/models/{name}/versions/{version}")
    emit(c, d, lambda d: console.print(f"deleted {name}:{version} and {len(d.get('variants') or [])} variant(s)"))
