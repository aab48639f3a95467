"""A do-nothing HTTP/1.1 server, the reference row of bench/edge_server.py: it reads each request
(head and Content-Length body) and replays a canned inference response, on one thread per
keep-alive connection, no parsing beyond that. The same client against it shows the floor of a
loopback round trip by a Python client, so the rest of the edge server's latency is its own.

    python bench/_null_http.py PORT JSON_BODY_FILE BINARY_BODY_FILE BINARY_HEADER_LENGTH

A request with an ``Inference-Header-Content-Length`` header (tritonclient's binary tensors) gets
the binary body, any other the JSON one.
"""

from __future__ import annotations

import re
import socket
import sys
import threading
from pathlib import Path

_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def canned(body: bytes, content_type: str, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


def serve(conn: socket.socket, json_reply: bytes, binary_reply: bytes) -> None:
    buf = b""
    with conn:
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                chunk = conn.recv(262144)
                if not chunk:
                    return
                buf += chunk
                end = buf.find(b"\r\n\r\n")
            head, buf = buf[: end + 2], buf[end + 4 :]
            m = _LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            while len(buf) < length:
                chunk = conn.recv(262144)
                if not chunk:
                    return
                buf += chunk
            buf = buf[length:]
            binary = b"inference-header-content-length" in head.lower()
            conn.sendall(binary_reply if binary else json_reply)


def main() -> None:
    port, json_file, bin_file, bin_header = sys.argv[1:5]
    json_reply = canned(Path(json_file).read_bytes(), "application/json")
    binary_reply = canned(
        Path(bin_file).read_bytes(), "application/octet-stream", f"Inference-Header-Content-Length: {bin_header}\r\n"
    )
    lsock = socket.create_server(("127.0.0.1", int(port)), backlog=128)
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn, json_reply, binary_reply), daemon=True).start()


if __name__ == "__main__":
    main()
