"""A real OpenSSH ``sshd`` on a free loopback port, for tests that must meet the genuine article.

It runs in the foreground (``-D -e``) as a child process with a generated config, its own
ed25519 host key and an authorized_keys file in its own directory, and lets in only the
current user, by public key. Raises :class:`SSHDUnavailable` when no sshd is installed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import asyncssh

from evc.embedded import free_port
from evc.errors import ConfigError

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")


class SSHDUnavailable(ConfigError):
    """OpenSSH's sshd is not installed (or cannot run) here."""

    code = "sshd_unavailable"


def sshd_binary() -> str:
    """Absolute path of sshd (it refuses to re-exec from a relative one)."""
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    raise SSHDUnavailable("OpenSSH sshd is not installed (Debian/Ubuntu: apt-get install openssh-server)")


def established_connections(port: int) -> int:
    """Established TCP connections whose local port is *port* (read from /proc/net/tcp{,6}:
    the server's side of each connection to a listener on this machine)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)  # header
            for row in f:
                cols = row.split()
                if len(cols) > 3 and cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


class OpenSSHServer:
    """One ``sshd -D -e -f <config>`` child process serving the current user on loopback."""

    def __init__(self, work_dir: Path | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="evc-sshd-"))
        self.host = host
        self.port = port
        self.username = pwd.getpwuid(os.geteuid()).pw_name
        self.host_key_public = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def authorized_keys_path(self) -> Path:
        return self.work_dir / "authorized_keys"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "sshd_config"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "sshd.log"

    def authorize(self, public_key_line: str) -> None:
        """Append a public key line to the server's authorized_keys (if not already there)."""
        line = public_key_line.strip()
        ak = self.authorized_keys_path
        lines = ak.read_text().splitlines() if ak.exists() else []
        if line not in lines:
            with ak.open("a") as f:
                f.write(line + "\n")
        os.chmod(ak, 0o600)

    def _write_files(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o700)
        key_path = self.work_dir / "ssh_host_ed25519_key"
        if not key_path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment="evc-test-sshd")
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key())
        key = asyncssh.read_private_key(str(key_path))
        self.host_key_public = " ".join(key.export_public_key().decode().split()[:2])
        self.authorized_keys_path.touch(mode=0o600)
        root = os.geteuid() == 0
        lines = [
            f"ListenAddress {self.host}:{self.port}",
            f"HostKey {key_path}",
            "PidFile none",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "StrictModes no",
            "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"PermitRootLogin {'prohibit-password' if root else 'no'}",
            f"AllowUsers {self.username}",
            "Subsystem sftp internal-sftp",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> OpenSSHServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        binary = sshd_binary()
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        for attempt in range(3):
            if not self.port or attempt:
                self.port = free_port(self.host)
            self._write_files()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [binary, "-D", "-e", "-f", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )  # fmt: skip
            if self._wait_ready(timeout):
                return self
            log_tail = self.log_path.read_text(errors="replace")[-1500:]
            self.stop()
            if "Address already in use" not in log_tail:
                raise SSHDUnavailable(f"sshd did not start on {self.host}:{self.port}: {log_tail}")
        raise SSHDUnavailable(f"sshd found no free port on {self.host}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the port answers with an SSH banner; False when sshd exited."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def connection_count(self) -> int:
        """How many TCP connections to this server are established now."""
        return established_connections(self.port)

    def stop(self) -> None:
        """Stop sshd and the sessions it forked (they share its process group)."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def close(self) -> None:
        """Stop and remove the server's directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> OpenSSHServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
