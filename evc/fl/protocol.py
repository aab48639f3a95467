"""Server side of the FL client protocol: line-delimited JSON, parameters as base64 ``.npz``.

The device runs ``python3 client.py --data <shard.npz>`` (:data:`CLIENT_PATH` is the file to
ship) and keeps it running for the whole job; the server writes one request line and reads one
reply line at a time.  The message shapes are documented in :mod:`evc.device.fl_client`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evc.device.fl_client import PROTOCOL_VERSION, decode_params, encode_params
from evc.errors import CommandFailed, DeviceError, ValidationError
from evc.fl.strategy import FitConfig

__all__ = [
    "CLIENT_MODELS_PATH",
    "CLIENT_PATH",
    "PROTOCOL_VERSION",
    "EvaluateReply",
    "FitReply",
    "decode_message",
    "decode_params",
    "encode_message",
    "encode_params",
    "evaluate_request",
    "fit_request",
    "get_parameters_request",
    "params_from_npz",
    "params_to_npz",
    "parse_evaluate_reply",
    "parse_fit_reply",
    "parse_get_parameters_reply",
    "ping_request",
    "shutdown_request",
]

#: the self-contained device runtime, to copy to devices (numpy is its only dependency)
CLIENT_PATH: Path = Path(__file__).resolve().parent.parent / "device" / "fl_client.py"
#: shipped beside the client as ``fl_models.py`` (the CNN's maths, plug-ins); numpy only too
CLIENT_MODELS_PATH: Path = CLIENT_PATH.with_name("fl_models.py")


def params_to_npz(params: Sequence[np.ndarray]) -> bytes:
    """Parameters as the bytes of an ``.npz`` (``arr_0 ..``), e.g. for a model download."""
    return base64.b64decode(encode_params(params))


def params_from_npz(data: bytes) -> list[np.ndarray]:
    """Inverse of :func:`params_to_npz`; raises :class:`ValidationError` on a bad file."""
    try:
        return decode_params(base64.b64encode(data).decode("ascii"))
    except (ValueError, OSError, KeyError) as exc:
        raise ValidationError(f"not a parameter .npz: {exc}") from exc


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One protocol line: compact JSON plus ``\\n``."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_message(line: bytes | str, *, device_id: str | None = None) -> dict[str, Any]:
    """Parse one reply line; raises :class:`DeviceError` when it is not a JSON object."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        text = line[:200] if isinstance(line, str) else line[:200].decode("utf-8", "replace")
        raise DeviceError(f"FL client sent a malformed line: {text!r}", device_id=device_id) from exc
    if not isinstance(message, dict):
        raise DeviceError(f"FL client sent {type(message).__name__}, not an object",
                          device_id=device_id)  # fmt: skip
    return message


def fit_request(
    params: Sequence[np.ndarray],
    config: FitConfig,
    *,
    request_id: str | int | None = None,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """The ``fit`` request for one client and round (``config`` from ``configure_fit``)."""
    wire: dict[str, Any] = {
        "epochs": config["epochs"],
        "lr": config["lr"],
        "batch_size": config["batch_size"],
        "seed": config["seed"],
        "prox_mu": config["prox_mu"],
        "model": config["model"],
    }
    if n_classes is not None:
        wire["n_classes"] = n_classes
    request: dict[str, Any] = {
        "op": "fit",
        "round": config["round"],
        "client_index": config["client_index"],
        "params": encode_params(params),
        "config": wire,
    }
    if request_id is not None:
        request["id"] = request_id
    return request


def evaluate_request(
    params: Sequence[np.ndarray],
    *,
    round: int | None = None,
    model: str = "softmax",
    request_id: str | int | None = None,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """An ``evaluate`` request: the client scores ``params`` on its local data."""
    config: dict[str, Any] = {"model": model}
    if n_classes is not None:
        config["n_classes"] = n_classes
    request: dict[str, Any] = {
        "op": "evaluate",
        "round": round,
        "params": encode_params(params),
        "config": config,
    }
    if request_id is not None:
        request["id"] = request_id
    return request


def get_parameters_request(
    model: str, *, seed: int | None, n_classes: int, request_id: str | int | None = None
) -> dict[str, Any]:
    """Ask a client for *model*'s initial parameters (Flower's ``get_parameters``): how the
    server learns a device-side (``module:``) model's shapes and weights without running it."""
    request: dict[str, Any] = {
        "op": "get_parameters",
        "config": {"model": model, "seed": seed, "n_classes": n_classes},
    }
    if request_id is not None:
        request["id"] = request_id
    return request


def parse_get_parameters_reply(message: Mapping[str, Any], *, device_id: str | None = None) -> list[np.ndarray]:
    """Check and decode a ``get_parameters`` reply (errors as in :func:`parse_fit_reply`)."""
    _check_ok(message, "get_parameters", device_id)
    try:
        params = decode_params(str(message["params"]))
    except (KeyError, TypeError, ValueError, OSError, binascii.Error) as exc:
        raise DeviceError(f"malformed get_parameters reply: {exc}", device_id=device_id) from exc
    if not params:
        raise DeviceError("the model has no parameters", device_id=device_id)
    return params


def ping_request() -> dict[str, Any]:
    return {"op": "ping"}


def shutdown_request() -> dict[str, Any]:
    return {"op": "shutdown"}


@dataclass(frozen=True)
class FitReply:
    """A successful ``fit`` answer."""

    round: int | None
    params: list[np.ndarray]
    num_examples: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class EvaluateReply:
    """A successful ``evaluate`` answer."""

    round: int | None
    num_examples: int
    metrics: dict[str, Any]


def _check_ok(message: Mapping[str, Any], op: str, device_id: str | None) -> None:
    if message.get("ok") is not True:
        error = str(message.get("error", "no error message"))
        raise CommandFailed(f"FL client {op} failed: {error}", device_id=device_id, stderr=error)
    if message.get("op") != op:
        raise DeviceError(f"FL client answered op {message.get('op')!r} to a {op} request", device_id=device_id)


def parse_fit_reply(message: Mapping[str, Any], *, device_id: str | None = None) -> FitReply:
    """Check and decode a ``fit`` reply.

    Raises :class:`CommandFailed` for ``ok: false`` (``stderr`` holds the client's error) and
    :class:`DeviceError` for a malformed reply.
    """
    _check_ok(message, "fit", device_id)
    try:
        params = decode_params(str(message["params"]))
        num_examples = int(message["num_examples"])
        metrics = dict(message.get("metrics") or {})
    except (KeyError, TypeError, ValueError, OSError, binascii.Error) as exc:
        raise DeviceError(f"malformed fit reply: {exc}", device_id=device_id) from exc
    return FitReply(message.get("round"), params, num_examples, metrics)


def parse_evaluate_reply(message: Mapping[str, Any], *, device_id: str | None = None) -> EvaluateReply:
    """Check and decode an ``evaluate`` reply (errors as in :func:`parse_fit_reply`)."""
    _check_ok(message, "evaluate", device_id)
    try:
        return EvaluateReply(message.get("round"), int(message["num_examples"]), dict(message["metrics"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DeviceError(f"malformed evaluate reply: {exc}", device_id=device_id) from exc
