"""The Open Inference Protocol (KServe v2 REST) over a :class:`Repository`, on the standard
library's threading HTTP server (HTTP/1.1 keep-alive, one thread per connection).

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
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from . import __version__
from .metrics import UNKNOWN, InferMetrics
from .repository import ModelUnavailable, Repository, UnknownModel
from .tensors import HEADER_LENGTH, TensorError, decode_inputs, encode_response, requested_outputs, split_body

log = logging.getLogger(__name__)

SERVER_NAME = "evc-edge-infer"
EXTENSIONS = ["binary_tensor_data"]
JSON_TYPE = "application/json"
DEFAULT_MAX_BODY = 64 * 1024 * 1024


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: dict[str, str] | None = None
    #: a served inference to record before the response is written: (model, version, compute s, batch)
    served: tuple[str, str, float, int | None] | None = None


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
        model = name if name in self.repo.names() else UNKNOWN
        label_version = version or ""
        try:
            mv = self.repo.get(name, version)
            label_version = mv.version
            if not mv.ready:
                raise ModelUnavailable(f"model {mv.name} version {mv.version} is unavailable: {mv.reason}")
            encoding = headers.get("Content-Encoding", "identity")
            if encoding not in ("identity", ""):
                raise TensorError(f"Content-Encoding {encoding} is not supported: send the body uncompressed")
            doc, binary = split_body(body, headers.get(HEADER_LENGTH))
            inputs = decode_inputs(doc, binary)
            outputs, binary_out, default_binary = requested_outputs(doc)
            names = mv.prepare(inputs, outputs)
            t0 = time.perf_counter()
            try:
                results = mv.run(names, inputs)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors
                status = _ort_status(exc)
                self.metrics.failed(model, label_version, status, "bad_request" if status == 400 else "internal")
                return error(status, f"inference failed: {exc}")
            compute = time.perf_counter() - t0
            head: dict[str, Any] = {"model_name": mv.name, "model_version": mv.version}
            if isinstance(doc.get("id"), str):
                head["id"] = doc["id"]
            data, header_length = encode_response(head, results, binary_out, default_binary)
        except UnknownModel as exc:
            self.metrics.failed(model, label_version, 404, "not_found")
            return error(404, str(exc))
        except ModelUnavailable as exc:
            self.metrics.failed(model, label_version, 503, "unavailable")
            return error(503, str(exc))
        except TensorError as exc:
            self.metrics.failed(model, label_version, 400, "bad_request")
            return error(400, str(exc))
        first = next(iter(inputs.values()))
        batch = int(first.shape[0]) if first.ndim >= 1 else None
        if header_length is None:
            return Response(200, data, served=(mv.name, mv.version, compute, batch))
        return Response(
            200,
            data,
            "application/octet-stream",
            {HEADER_LENGTH: str(header_length)},
            served=(mv.name, mv.version, compute, batch),
        )


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; each response is written in one call (with TCP_NODELAY: no Nagle delay)."""

    protocol_version = "HTTP/1.1"
    server_version = f"{SERVER_NAME}/{__version__}"
    server: InferHTTPServer

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        t0 = time.perf_counter()
        srv = self.server
        srv.enter()
        try:
            resp = self._response(method)
            if resp.served is not None:  # recorded before the answer leaves: a client then sees it counted
                model, version, compute, batch = resp.served
                srv.app.metrics.served(model, version, resp.status, time.perf_counter() - t0, compute, batch)
            self._write(resp)
        finally:
            srv.leave()

    def _response(self, method: str) -> Response:
        path = self.path.split("?", 1)[0]
        parts = [unquote(p) for p in path.strip("/").split("/") if p]
        body = b""
        if method == "POST":
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                return error(411, "send a Content-Length (chunked bodies are not supported)")
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                self.close_connection = True
                return error(400, "Content-Length is not a number")
            if length > self.server.max_body:
                self.close_connection = True
                return error(413, f"the body is {length} bytes, more than the limit of {self.server.max_body}")
            body = self.rfile.read(length) if length > 0 else b""
        try:
            return self.server.app.handle(method, parts, self.headers, body)
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            log.exception("%s %s failed", method, self.path)
            return error(500, f"internal error: {exc}")

    def _write(self, resp: Response) -> None:
        lines = [
            "HTTP/1.1 {} {}".format(resp.status, self.responses.get(resp.status, ("",))[0]),
            "Server: " + self.server_version,
            "Content-Type: " + resp.content_type,
            f"Content-Length: {len(resp.body)}",
        ]
        for k, v in (resp.headers or {}).items():
            lines.append(f"{k}: {v}")
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + resp.body)
        self.log_request(resp.status, len(resp.body))


class InferHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body
        self._inflight = 0
        self._idle = threading.Condition()
        super().__init__(address, Handler)

    def enter(self) -> None:
        with self._idle:
            self._inflight += 1

    def leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is being served (at most *timeout* s); False if some still are."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


class InferServer:
    """The server on a background thread: :meth:`start`, :meth:`reload`, :meth:`stop`."""

    def __init__(
        self, repo: Repository, metrics: InferMetrics, host: str, port: int, max_body: int = DEFAULT_MAX_BODY
    ) -> None:
        self.app = App(repo, metrics)
        self.host = host
        self.port = port
        self.max_body = max_body
        self._httpd: InferHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def reload(self) -> None:
        """Rescan the models folder (new versions load, removed ones go, changed ones reload)."""
        self.app.metrics.models(self.app.repo.scan())

    def start(self) -> int:
        """Load the models and start serving; returns the bound port (useful with port 0)."""
        self.reload()
        httpd = InferHTTPServer((self.host, self.port), self.app, self.max_body)
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
