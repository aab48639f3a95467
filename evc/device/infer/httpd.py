"""The edge server's HTTP/1.1 layer: keep-alive connections, one thread each, on plain sockets.

Lean on purpose: a request costs one ``recv`` when it fits in one segment (head and body), a
fixed parse of the request line and headers (no ``email`` parser, no per-request logging),
and one ``send`` of pre-encoded header bytes and the body. Each connection has its own thread,
so ONNX Runtime (which releases the GIL) runs requests of several clients at once.

What it speaks: ``GET`` and ``POST`` with a ``Content-Length`` body (``Expect: 100-continue``
answered); chunked bodies get 411, bodies over the limit 413, other methods 501, a malformed
request 400, all as ``{"error": "..."}`` (then the connection closes). HTTP/1.0 closes after
each response unless the client asked for keep-alive; ``Connection: close`` is honoured.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from typing import Any, Callable, Dict

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
RECV_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024  # request line and headers together
LINGER_S, LINGER_BYTES = 1.0, 4 * 1024 * 1024  # reading a refused request's rest before closing
KEEP, CLOSE, REFUSED = 0, 1, 2
_PHRASES = {int(s): s.phrase for s in HTTPStatus}


class Headers(Dict[str, str]):
    """Request headers by lower-cased name; :meth:`get` takes any case (as ``email.message`` does)."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


_get = dict.get  # this module's lookups: lower-case names already


class Reply:
    """What a handler answers: status, body, content type, extra headers; *served* is the
    handler's own record of the request (passed to the *record* callback with the time)."""

    __slots__ = ("status", "body", "content_type", "headers", "served")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = JSON_TYPE,
        headers: dict[str, str] | None = None,
        served: Any = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.served = served


#: handle(method, path, headers, body) -> Reply; record(reply, seconds since the request was read)
Handle = Callable[[str, str, Headers, bytes], Any]
Record = Callable[[Any, float], None]


class BadRequest(Exception):
    """The request cannot be served: (status, message); the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, bool, Headers]:
    """A request head (without the blank line) as (method, target, HTTP/1.1 or later, headers)."""
    request_line, _, rest = head.decode("latin-1").partition("\r\n")
    words = request_line.split()
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise BadRequest(400, f"malformed request line {request_line[:100]!r}")
    headers = Headers()
    for line in rest.split("\r\n") if rest else ():
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = headers[key] + ", " + value if key in headers else value
    return words[0], words[1], words[2] != "HTTP/1.0", headers


def keeps_alive(http11: bool, headers: Headers) -> bool:
    tokens = _get(headers, "connection", "").lower()
    if http11:
        return "close" not in tokens
    return "keep-alive" in tokens


class Connection:
    """One client connection: reads requests, calls the handler, writes the replies."""

    def __init__(self, server: HTTPServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buf = b""

    def serve(self) -> None:
        linger = False
        try:
            while True:
                state = self._one()
                if state != KEEP:
                    linger = state == REFUSED
                    break
        except OSError:
            pass  # the client went away (reset, broken pipe) or the server closed the socket
        except Exception:  # noqa: BLE001 - a bug here must not pass silently
            log.exception("connection failed")
        finally:
            self.server.forget(self.sock)
            self._close(linger)

    def _close(self, linger: bool) -> None:
        """Close; after a refused request, read what the client still sends first (a while),
        so that closing with unread data does not reset the connection before it reads the answer."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            if linger:
                self.sock.settimeout(LINGER_S)
                left = LINGER_BYTES
                while left > 0 and self.sock.recv(min(left, RECV_SIZE)):
                    left -= RECV_SIZE
        except OSError:
            pass
        finally:
            self.sock.close()

    def _head(self) -> bytes | None:
        """The next request head, or None when the client closed between requests."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise BadRequest(431, f"the request head is over {MAX_HEAD} bytes")
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                return None
            start = max(0, len(buf) - 3)
            buf += chunk
            end = buf.find(b"\r\n\r\n", start)
        self.buf = buf[end + 4 :]
        return buf[:end]

    def _body(self, length: int) -> bytes:
        buf = self.buf
        if len(buf) >= length:
            self.buf = buf[length:]
            return buf[:length] if len(buf) > length else buf
        body = bytearray(length)  # read straight into place: no concatenation of large bodies
        view = memoryview(body)
        view[: len(buf)] = buf
        pos = len(buf)
        self.buf = b""
        recv_into = self.sock.recv_into
        while pos < length:
            n = recv_into(view[pos:])
            if n == 0:
                raise ConnectionResetError("the client closed before sending its whole body")
            pos += n
        return bytes(body) if length < 65536 else body  # type: ignore[return-value]

    def _one(self) -> int:
        """Serve one request: KEEP, CLOSE, or REFUSED (answered with an error, body unread)."""
        try:
            head = self._head()
            if head is None:
                return CLOSE
            t0 = time.perf_counter()
            method, target, http11, headers = parse_head(head)
            alive = keeps_alive(http11, headers)
            body = self._read_body(method, http11, headers)
        except BadRequest as exc:
            self._write(Reply(exc.status, _error_body(str(exc))), False)
            return REFUSED
        srv = self.server
        srv.enter()
        try:
            reply = self._call(method, target, headers, body)
            if reply.served is not None and srv.record is not None:  # counted before the answer leaves
                srv.record(reply, time.perf_counter() - t0)
            self._write(reply, alive)
        finally:
            srv.leave()
        return KEEP if alive else CLOSE

    def _read_body(self, method: str, http11: bool, headers: Headers) -> bytes:
        if method not in ("GET", "POST"):
            raise BadRequest(501, f"method {method} is not supported: use GET or POST")
        if "chunked" in _get(headers, "transfer-encoding", "").lower():
            raise BadRequest(411, "send a Content-Length (chunked bodies are not supported)")
        try:
            length = int(_get(headers, "content-length", "0"))
        except ValueError:
            raise BadRequest(400, "Content-Length is not a number") from None
        if length < 0:
            raise BadRequest(400, "Content-Length is negative")
        if length > self.server.max_body:
            raise BadRequest(413, f"the body is {length} bytes, more than the limit of {self.server.max_body}")
        if length == 0:
            return b""
        if http11 and _get(headers, "expect", "").lower() == "100-continue" and not self.buf:
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._body(length)
        return body if method == "POST" else b""

    def _call(self, method: str, target: str, headers: Headers, body: bytes) -> Any:
        try:
            return self.server.handle(method, target, headers, body)
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            log.exception("%s %s failed", method, target)
            return Reply(500, _error_body(f"internal error: {exc}"))

    def _write(self, reply: Any, alive: bool) -> None:
        head = self.server.head(reply.status, reply.content_type) + str(len(reply.body)).encode()
        if reply.headers:
            head += "".join(f"\r\n{k}: {v}" for k, v in reply.headers.items()).encode("latin-1")
        head += b"\r\n\r\n" if alive else b"\r\nConnection: close\r\n\r\n"
        body = reply.body
        if len(body) < 65536:
            self.sock.sendall(head + body)
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()


class HTTPServer:
    """Accepts connections on *address* and serves each on its own (daemon) thread."""

    def __init__(
        self,
        address: tuple[str, int],
        handle: Handle,
        server_header: str,
        max_body: int,
        record: Record | None = None,
        backlog: int = 128,
    ) -> None:
        self.handle = handle
        self.record = record
        self.max_body = max_body
        self._server = server_header
        self._heads: dict[tuple[int, str], bytes] = {}
        self._inflight = 0
        self._idle = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._closing = False
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(backlog)
        except OSError:
            self.sock.close()
            raise
        self.server_address: tuple[Any, ...] = self.sock.getsockname()

    def head(self, status: int, content_type: str) -> bytes:
        """The status line and fixed headers of a reply, up to the Content-Length value (cached)."""
        key = (status, content_type)
        head = self._heads.get(key)
        if head is None:
            text = f"HTTP/1.1 {status} {_PHRASES.get(status, '')}\r\nServer: {self._server}\r\n"
            head = self._heads[key] = (text + f"Content-Type: {content_type}\r\nContent-Length: ").encode("latin-1")
        return head

    def serve_forever(self) -> None:
        """Accept until :meth:`shutdown`."""
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.01)  # out of descriptors, say: try again rather than stop serving
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            with self._idle:
                self._conns.add(conn)
            threading.Thread(target=Connection(self, conn).serve, name="evc-infer-conn", daemon=True).start()

    def shutdown(self) -> None:
        """Stop accepting (connections already open are served until :meth:`server_close`)."""
        self._closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()

    def server_close(self) -> None:
        """Close every connection (call after :meth:`drain`: requests in progress have finished)."""
        self.shutdown()
        with self._idle:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def forget(self, conn: socket.socket) -> None:
        with self._idle:
            self._conns.discard(conn)

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


__all__: list[str] = ["HTTPServer", "Headers", "Reply", "BadRequest", "parse_head", "JSON_TYPE"]
