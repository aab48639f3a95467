"""The Open Inference Protocol (KServe v2 REST) over a :class:`Repository`, on the lean HTTP/1.1
server of :mod:`.httpd` (keep-alive, one thread per connection).

Routes (``{v}``: ``/versions/<version>``, optional; without it the highest ready version):

- ``GET /v2/health/live``, ``GET /v2/health/ready`` (ready: every model found has loaded, and
  there is one; 400 when not, as the protocol says)
- ``GET /v2``: server metadata; ``GET /v2/models/<name>{v}``: model metadata;
  ``GET /v2/models/<name>{v}/ready``
- ``POST /v2/models/<name>{v}/infer``: JSON tensors, and the binary tensor data extension
- ``POST /v2/repository/index``: every version with its state, reason and SHA-256
- ``GET /metrics``: Prometheus

Errors are ``{"error": "..."}``: 400 for a bad request, 404 for an unknown model or route, 503
for a model version that is present but did not load (its reason), 500 for anything else.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any
from urllib.parse import unquote

from . import __version__
from .httpd import HTTPServer, Reply
from .metrics import UNKNOWN, InferMetrics
from .plans import MAX_HEADER, Plan, Plans, plan_inputs
from .repository import ModelUnavailable, ModelVersion, Repository, UnknownModel
from .tensors import HEADER_LENGTH, TensorError, decode_inputs, encode_response, requested_outputs, split_body

log = logging.getLogger(__name__)

SERVER_NAME = "evc-edge-infer"
EXTENSIONS = ["binary_tensor_data"]
DEFAULT_MAX_BODY = 64 * 1024 * 1024

#: status, body, content type, extra headers, and ``served``: an inference to record before the
#: response is written, (model, version, compute s, batch)
Response = Reply


def reply(status: int, doc: Any) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode())


def error(status: int, message: str) -> Response:
    return reply(status, {"error": message})


def _ort_status(exc: Exception) -> int:
    """ONNX Runtime's InvalidArgument (wrong input for the graph) is the client's fault."""
    return 400 if type(exc).__name__ in ("InvalidArgument", "InvalidGraph") else 500


class App:
    """The protocol, free of HTTP plumbing: (method, path segments, headers, body) -> Response."""

    def __init__(self, repo: Repository, metrics: InferMetrics) -> None:
        self.repo = repo
        self.metrics = metrics
        self.stopping = False
        self.plans = Plans()

    def handle(self, method: str, parts: list[str], headers: Any, body: bytes) -> Response:
        if parts == ["metrics"]:
            if method != "GET":
                return error(405, "use GET for /metrics")
            data, ctype = self.metrics.render()
            return Response(200, data, ctype)
        if not parts or parts[0] != "v2":
            return error(404, "no route {}".format("/" + "/".join(parts)))
        rest = parts[1:]
        if rest[:1] == ["models"] and len(rest) >= 2:
            return self._model_route(method, rest[1:], headers, body)
        if method == "GET":
            if rest == []:
                return reply(200, {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})
            if rest == ["health", "live"]:
                return reply(200, {"live": True})
            if rest == ["health", "ready"]:
                ready = self.repo.ready() and not self.stopping
                return reply(200 if ready else 400, {"ready": ready})
        if method == "POST" and rest == ["repository", "index"]:
            return reply(200, [mv.index_entry() for mv in self.repo.versions()])
        return error(404 if method in ("GET", "POST") else 405, "no route {} {}".format(method, "/" + "/".join(parts)))

    def _model_route(self, method: str, parts: list[str], headers: Any, body: bytes) -> Response:
        name, rest = parts[0], parts[1:]
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        if method == "POST" and rest == ["infer"]:
            return self.infer(name, version, headers, body)
        if method != "GET" or rest not in ([], ["ready"]):
            return error(404, "no route {} /v2/models/{}/{}".format(method, name, "/".join(parts[1:])))
        try:
            mv = self.repo.get(name, version)
        except UnknownModel as exc:
            return error(404, str(exc))
        if rest == ["ready"]:
            return reply(200 if mv.ready else 400, {"name": mv.name, "version": mv.version, "ready": mv.ready})
        if not mv.ready:
            return error(503, f"model {mv.name} version {mv.version} is unavailable: {mv.reason}")
        return reply(200, mv.metadata(self.repo.version_names(name)))

    def infer(self, name: str, version: str | None, headers: Any, body: bytes) -> Response:
        model = name if name in self.repo else UNKNOWN
        label_version = version or ""
        try:
            mv = self.repo.get(name, version)
            label_version = mv.version
            if not mv.ready:
                raise ModelUnavailable(f"model {mv.name} version {mv.version} is unavailable: {mv.reason}")
            encoding = headers.get("Content-Encoding", "identity")
            if encoding not in ("identity", ""):
                raise TensorError(f"Content-Encoding {encoding} is not supported: send the body uncompressed")
            return self._infer(mv, (name, version), headers.get(HEADER_LENGTH), body)
        except UnknownModel as exc:
            self.metrics.failed(model, label_version, 404, "not_found")
            return error(404, str(exc))
        except ModelUnavailable as exc:
            self.metrics.failed(model, label_version, 503, "unavailable")
            return error(503, str(exc))
        except TensorError as exc:
            self.metrics.failed(model, label_version, 400, "bad_request")
            return error(400, str(exc))
        except _RunFailed as exc:
            status = _ort_status(exc.cause)
            self.metrics.failed(model, label_version, status, "bad_request" if status == 400 else "internal")
            return error(status, f"inference failed: {exc.cause}")

    def _infer(
        self, mv: ModelVersion, asked: tuple[str, str | None], header_length: str | None, body: bytes
    ) -> Response:
        """A request to *mv* (ready), *asked* by (name, version): planned, else read and checked."""
        key = plan = None
        if header_length is not None and header_length.isdigit() and int(header_length) <= MAX_HEADER:
            offset = int(header_length)
            key = (asked[0], asked[1], bytes(body[:offset]))
            plan = self.plans.get(key)
        if plan is not None and plan.mv is mv and len(body) == offset + plan.size:
            inputs = plan.arrays(body, offset)
            t0 = time.perf_counter()
            results = _run(mv, plan.names, inputs)
            compute = time.perf_counter() - t0
            data, length = plan.encode(results)
            return _answer(data, length, (mv.name, mv.version, compute, plan.batch))
        doc, binary = split_body(body, header_length)
        inputs = decode_inputs(doc, binary)
        outputs, binary_out, default_binary = requested_outputs(doc)
        names = mv.prepare(inputs, outputs)
        t0 = time.perf_counter()
        results = _run(mv, names, inputs)
        compute = time.perf_counter() - t0
        head: dict[str, Any] = {"model_name": mv.name, "model_version": mv.version}
        if isinstance(doc.get("id"), str):
            head["id"] = doc["id"]
        planned = plan_inputs(doc, inputs) if key is not None else None
        if key is not None and planned:
            self.plans.add(key, Plan(mv, planned, names, binary_out, default_binary, head))
        data, length = encode_response(head, results, binary_out, default_binary)
        first = next(iter(inputs.values()))
        return _answer(data, length, (mv.name, mv.version, compute, int(first.shape[0]) if first.ndim >= 1 else None))


class _RunFailed(Exception):
    """ONNX Runtime's own error (*cause*) running a request that passed the checks."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _run(mv: ModelVersion, names: list[str], inputs: dict[str, Any]) -> dict[str, Any]:
    try:
        return mv.run(names, inputs)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors
        raise _RunFailed(exc) from exc


def _answer(data: bytes, header_length: int | None, served: tuple[str, str, float, int | None]) -> Response:
    """A successful inference's response: JSON, or a JSON header and binary tensors."""
    if header_length is None:
        return Response(200, data, served=served)
    return Response(200, data, "application/octet-stream", {HEADER_LENGTH: str(header_length)}, served=served)


def _parts(target: str) -> list[str]:
    """A request target's path as its segments, percent-decoded (the query string ignored)."""
    path = target.split("?", 1)[0]
    if "%" in path:
        return [unquote(p) for p in path.split("/") if p]
    return [p for p in path.split("/") if p]


class InferServer:
    """The server on a background thread: :meth:`start`, :meth:`reload`, :meth:`stop`."""

    def __init__(
        self, repo: Repository, metrics: InferMetrics, host: str, port: int, max_body: int = DEFAULT_MAX_BODY
    ) -> None:
        self.app = App(repo, metrics)
        self.host = host
        self.port = port
        self.max_body = max_body
        self._httpd: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _handle(self, method: str, target: str, headers: Any, body: bytes) -> Response:
        return self.app.handle(method, _parts(target), headers, body)

    def _record(self, resp: Response, seconds: float) -> None:
        model, version, compute, batch = resp.served
        self.app.metrics.served(model, version, resp.status, seconds, compute, batch)

    def reload(self) -> None:
        """Rescan the models folder (new versions load, removed ones go, changed ones reload)."""
        self.app.metrics.models(self.app.repo.scan())

    def start(self) -> int:
        """Load the models and start serving; returns the bound port (useful with port 0)."""
        self.reload()
        httpd = HTTPServer(
            (self.host, self.port), self._handle, f"{SERVER_NAME}/{__version__}", self.max_body, self._record
        )
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, name="evc-infer-http", daemon=True)
        self._thread.start()
        return self.port

    def stop(self, grace: float = 10.0) -> bool:
        """Stop accepting, let requests in progress finish (at most *grace* s), close.
        Returns False if some were still running."""
        self.app.stopping = True
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return True
        httpd.shutdown()
        drained = httpd.drain(grace)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return drained
