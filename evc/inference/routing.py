"""One endpoint for a whole deployment: ``POST /api/v1/deployments/{id}/infer``.

Each request goes to the ready device expected to answer first: its requests in progress
through EVC (counted in the store, so every API process sees them) plus one, times its recent
latency (a moving average; unknown: the average of the known ones). A device that failed a
request in the last ``COOLDOWN_S`` comes after the others. When a device cannot be reached or
answers 5xx, the request goes to the next one (at most ``MAX_TRIES`` devices); a 4xx is the
caller's and comes back as it is. :func:`rank` is the pure policy.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from evc.errors import InferFailed, PreconditionFailed
from evc.inference.oip import HEADER_LENGTH, Connection
from evc.inference.parallel import Target, targets
from evc.settings import Settings
from evc.store import Store, now

MAX_TRIES = 3
COOLDOWN_S = 10.0
#: request headers passed on to the device (the body's type and its binary section's start)
PASSED = ("Content-Type", HEADER_LENGTH)

Load = tuple[int, float | None, float | None]  # in progress, recent latency (s), last failure (epoch s)


def rank(devices: Sequence[str], loads: Mapping[str, Load], at: float, rng: random.Random | None = None) -> list[str]:
    """*devices* best first: recently failed last, then by (in progress + 1) x recent latency;
    ties in random order (so idle devices share the first requests)."""
    rng = rng or random.Random()  # noqa: S311 - spreading load, not security
    known = [lat for d in devices if (lat := loads.get(d, (0, None, None))[1]) is not None]
    default = sum(known) / len(known) if known else 1.0

    def key(d: str) -> tuple[bool, float, float]:
        out, lat, failed = loads.get(d, (0, None, None))
        recent_failure = failed is not None and at - failed < COOLDOWN_S
        return recent_failure, (out + 1) * (lat if lat is not None else default), rng.random()

    return sorted(devices, key=key)


@dataclass(frozen=True)
class Answer:
    """The device's response, as it sent it, and who answered after how many tries."""

    status: int
    body: bytes
    headers: dict[str, str]
    device: str
    tries: int


def forward(store: Store, settings: Settings, deployment_id: str, body: bytes, headers: Mapping[str, str]) -> Answer:
    """Send an Open Inference Protocol infer request to the deployment's best device."""
    dep = store.get_deployment(deployment_id)
    ready = {t.device: t for t in targets(store, dep)}
    if not ready:
        raise PreconditionFailed(f"deployment {deployment_id} has no running device", deployment=deployment_id)
    order = rank(list(ready), store.infer_loads(deployment_id), now())[:MAX_TRIES]
    path = f"/v2/models/{dep['model']}/versions/{dep['served_version']}/infer"
    sent = {k: v for k, v in headers.items() if k in PASSED}
    errors: list[str] = []
    for tries, dev in enumerate(order, start=1):
        answer = _one(store, settings, deployment_id, ready[dev], path, body, sent, errors)
        if answer is not None:
            return Answer(answer[0], answer[1], answer[2], ready[dev].name, tries)
    raise InferFailed(f"no device of deployment {deployment_id} answered: " + "; ".join(errors),
                      deployment=deployment_id)  # fmt: skip


def _one(store: Store, settings: Settings, dep_id: str, t: Target, path: str, body: bytes,
         headers: dict[str, str], errors: list[str]) -> tuple[int, bytes, dict[str, str]] | None:  # fmt: skip
    """One device's try: its answer, or None (the reason appended to *errors*) to try the next."""
    store.infer_begin(dep_id, t.device)
    t0 = time.monotonic()
    conn = Connection(t.endpoint, settings.inference_timeout_s)
    try:
        status, data, hdrs = conn.request("POST", path, body, headers)
    except InferFailed as exc:
        store.infer_end(dep_id, t.device, None)
        errors.append(f"{t.name}: {exc.message}")
        return None
    finally:
        conn.close()
    if status >= 500:
        store.infer_end(dep_id, t.device, None)
        errors.append(f"{t.name}: HTTP {status}")
        return None
    store.infer_end(dep_id, t.device, time.monotonic() - t0)
    return status, data, hdrs


__all__ = ["Answer", "forward", "rank"]
