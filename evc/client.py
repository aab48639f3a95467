"""A small HTTP client for EVC's API, used by the CLI (so the CLI works against a remote EVC)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import requests

from evc.errors import EVCError

#: job states after which nothing changes (evc.store.TERMINAL_STATES; not imported: no redis here)
TERMINAL = ("succeeded", "partial", "failed", "cancelled")


class APIError(EVCError):
    """The API answered with an error; ``message`` is the API's own."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message, http_status=status)
        self.status = status
        self.body = body


def is_local_url(url: str) -> bool:
    """True when *url* names this machine by a loopback address or ``localhost``: where the
    local admin token (from the data directory) may be sent without being asked for."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host.rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified  # connecting to 0.0.0.0 / :: reaches this machine


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def request(self, method: str, path: str, **kw: Any) -> Any:
        kw.setdefault("timeout", self.timeout)
        try:
            resp = self.session.request(method, self.url + path, **kw)
        except requests.ConnectionError as exc:
            raise APIError(
                0, f"cannot reach EVC at {self.url}: is `evc up` running? ({exc.__class__.__name__})"
            ) from exc
        except requests.Timeout as exc:
            raise APIError(0, f"EVC at {self.url} did not answer in {self.timeout} s") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
                msg = body.get("message") or body.get("status") or resp.reason
            except ValueError:
                body, msg = resp.text, resp.text[:300] or resp.reason
            raise APIError(resp.status_code, f"{resp.status_code} {msg}", body)
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.request("POST", path, json=json if json is not None else {}, headers=headers)

    def patch(self, path: str, json: Any) -> Any:
        return self.request("PATCH", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def follow(
        self, job_id: str, poll: float = 0.3, timeout: float | None = None
    ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Yield (job, new events) until the job ends."""
        after = 0
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            page = self.get(f"/api/v1/jobs/{job_id}/events", after=after, limit=1000)
            job = self.get(f"/api/v1/jobs/{job_id}")
            yield job, page["items"]
            after = page["next_after"]
            if job["state"] in TERMINAL:
                rest = self.get(f"/api/v1/jobs/{job_id}/events", after=after, limit=1000)["items"]
                if rest:
                    yield job, rest
                return
            if deadline and time.monotonic() > deadline:
                raise APIError(0, f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/api/v1/jobs/{job_id}")
            if job["state"] in TERMINAL:
                return dict(job)
            if time.monotonic() > deadline:
                raise APIError(0, f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)
