"""Run the FL client as a local subprocess speaking the real protocol over pipes.

Used by the tests, the reference benchmark and simulated devices: the same ``client.py`` the
devices run, started once per (job, device) and kept alive, as over SSH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from evc.errors import ConnectionDropped
from evc.fl.protocol import CLIENT_PATH, decode_message, encode_message, shutdown_request

__all__ = ["ClientProcess"]


class ClientProcess:
    """One long-lived ``python client.py --data <shard>`` child process.

    ``send`` writes a request line, ``receive`` reads the next reply line, ``request`` does both.
    Pipelining is allowed: send to many clients first, then receive from each, in order.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        data: str | os.PathLike[str],
        *,
        python: str = sys.executable,
        client: str | os.PathLike[str] = CLIENT_PATH,
        device_id: str | None = None,
        extra_args: Sequence[str] = (),
        stderr: IO[bytes] | int | None = None,
    ) -> None:
        self.device_id = device_id
        self.proc = subprocess.Popen(
            [python, str(Path(client)), "--data", str(data), *extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._stdout = self.proc.stdout

    def send(self, message: Mapping[str, Any]) -> None:
        try:
            self._stdin.write(encode_message(message))
            self._stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ConnectionDropped("FL client process is gone", device_id=self.device_id) from exc

    def send_raw(self, line: bytes) -> None:
        """Write raw bytes (for protocol tests)."""
        try:
            self._stdin.write(line)
            self._stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise ConnectionDropped("FL client process is gone", device_id=self.device_id) from exc

    def receive(self) -> dict[str, Any]:
        line = self._stdout.readline()
        if not line:
            raise ConnectionDropped(
                f"FL client process ended (exit status {self.proc.poll()})",
                device_id=self.device_id,
            )
        return decode_message(line, device_id=self.device_id)

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def close(self, timeout: float = 5.0) -> int:
        """Ask the client to shut down, kill it if it has not exited after ``timeout`` seconds,
        close our ends of stdin/stdout, and return its exit status (a stderr pipe the caller
        asked for is left open for the caller to read and close)."""
        if self.proc.poll() is None:
            try:
                self.send(shutdown_request())
                self._stdin.close()
                self.proc.wait(timeout=timeout)
            except (ConnectionDropped, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
        status = self.proc.wait()
        for pipe in (self._stdin, self._stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return status

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
