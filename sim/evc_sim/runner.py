"""Ways to run the simulator: in a thread for tests and in-process callers, or as a process.

* :class:`SimulatorThread` runs a :class:`~evc_sim.server.Simulator` on its own event loop
  thread and offers the same operations as plain synchronous calls.
* :func:`serve` / :func:`run_simulator` / :func:`serve_forever` run one in the foreground until
  SIGTERM or SIGINT, after writing a JSON state file that lists the devices for other processes.
* :func:`main` is the command line (``python -m evc_sim``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from evc.errors import ConfigError
from evc_sim import cpuquota
from evc_sim.device import FaultMode, Privilege, SimDevice
from evc_sim.server import Simulator
from evc_sim.spawn_helper import commands_start_with_default_signals

log = logging.getLogger(__name__)

T = TypeVar("T")


class SimulatorThread:
    """A :class:`Simulator` served by a private event loop thread, driven synchronously.

    ``with SimulatorThread(root) as sim: devices = sim.start(3)``; :meth:`stop` (or leaving the
    ``with`` block) stops the devices and the thread.
    """

    def __init__(
        self,
        root_dir: Path,
        *,
        host: str = "127.0.0.1",
        authorized_keys: Sequence[str] = (),
        base_port: int = 0,
        timeout: float = 120.0,
    ) -> None:
        self.simulator = Simulator(root_dir, host=host, authorized_keys=authorized_keys, base_port=base_port)
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- loop plumbing ------------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    commands_start_with_default_signals()  # (this thread's mask: the commands')
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="evc-sim", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._ensure_loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(self.timeout)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the devices are served on (started on first use)."""
        return self._ensure_loop()

    # -- the Simulator's operations, synchronously --------------------------------------------

    @property
    def devices(self) -> list[SimDevice]:
        return self.simulator.devices

    def device(self, name: str) -> SimDevice:
        return self.simulator.device(name)

    def start(
        self,
        n: int,
        prefix: str = "sim",
        *,
        privileges: Privilege | Sequence[str] = "user",
        cpus: Sequence[float] = (),
    ) -> list[SimDevice]:
        return self._run(self.simulator.start(n, prefix, privileges=privileges, cpus=cpus))

    def add(
        self,
        name: str,
        privilege: Privilege = "user",
        *,
        port: int | None = None,
        authorized_keys: Sequence[str] | None = None,
        cpus: float | None = None,
    ) -> SimDevice:
        return self._run(self.simulator.add(name, privilege, port=port, authorized_keys=authorized_keys, cpus=cpus))

    def set_cpus(self, name: str, cpus: float) -> None:
        self._run(_call(self.simulator.set_cpus, name, cpus))

    def remove(self, name: str) -> None:
        self._run(self.simulator.remove(name))

    def set_fault(
        self,
        name: str,
        mode: FaultMode,
        *,
        slow_s: float | None = None,
        drop_after_s: float | None = None,
    ) -> None:
        """Like :meth:`Simulator.set_fault`, returning once a restored device serves SSH."""

        async def apply() -> None:
            self.simulator.set_fault(name, mode, slow_s=slow_s, drop_after_s=drop_after_s)
            await self.simulator.settle()

        self._run(apply())

    def authorize(self, public_key_line: str, name: str | None = None) -> None:
        self._run(_call(self.simulator.authorize, public_key_line, name))

    def deauthorize(self, public_key_line: str, name: str | None = None) -> None:
        self._run(_call(self.simulator.deauthorize, public_key_line, name))

    def write_state(self, path: Path) -> None:
        self._run(_call(self.simulator.write_state, path))

    def stop(self) -> None:
        """Stop every device, then the loop thread. Safe to call twice."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(self.timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.timeout)
            if not thread.is_alive():
                loop.close()

    async def _shutdown(self) -> None:
        await self.simulator.stop()
        # let the sessions that were cut finish their clean-up before the loop goes away
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        if rest:
            await asyncio.wait(rest, timeout=5)
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> SimulatorThread:
        self._ensure_loop()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def serve(
    n: int,
    root_dir: Path,
    state_file: Path,
    *,
    authorized_keys: Sequence[str] = (),
    privileges: Privilege | Sequence[str] = "user",
    prefix: str = "sim",
    host: str = "127.0.0.1",
    base_port: int = 0,
    stop: asyncio.Event | None = None,
    ports: Mapping[str, int] | None = None,
    cpus: Sequence[float] = (),
) -> None:
    """Serve *n* devices until *stop* is set or SIGTERM/SIGINT arrives; keep *state_file* current.

    The state file is written once every device listens and removed when serving ends.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)  # only possible on the main thread
            handled.append(sig)
    sim = Simulator(root_dir, host=host, authorized_keys=authorized_keys, base_port=base_port)
    try:
        devices = await sim.start(n, prefix, privileges=privileges, ports=ports, cpus=cpus)
        sim.write_state(state_file)
        log.info("serving %d simulated devices; state in %s", len(devices), state_file)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await sim.stop()
        with contextlib.suppress(OSError):
            state_file.unlink()


def run_simulator(
    n: int,
    root_dir: Path,
    state_file: Path,
    authorized_keys: Sequence[str] = (),
    *,
    privileges: Privilege | Sequence[str] = "user",
    prefix: str = "sim",
    host: str = "127.0.0.1",
    base_port: int = 0,
    ports: Mapping[str, int] | None = None,
    cpus: Sequence[float] = (),
) -> None:
    """Blocking :func:`serve` on a fresh event loop: the target for a child process."""
    asyncio.run(
        serve(
            n, Path(root_dir), Path(state_file), authorized_keys=authorized_keys,
            privileges=privileges, prefix=prefix, host=host, base_port=base_port, ports=ports,
            cpus=cpus,
        )
    )  # fmt: skip


def read_keys_file(path: Path) -> list[str]:
    """The public key lines of an authorized_keys-style file (comments and blanks skipped)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read authorized keys from {path}: {exc.strerror}") from exc
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def serve_forever(
    n: int,
    root_dir: Path,
    state_file: Path,
    authorized_keys_file: Path | None,
    privileges: Privilege | Sequence[str] = "user",
    *,
    prefix: str = "sim",
    host: str = "127.0.0.1",
    base_port: int = 0,
    ports: Mapping[str, int] | None = None,
    cpus: Sequence[float] = (),
) -> None:
    """``evc sim``: serve *n* devices authorizing the keys in *authorized_keys_file*."""
    keys = read_keys_file(authorized_keys_file) if authorized_keys_file else []
    run_simulator(
        n, root_dir, state_file, keys,
        privileges=privileges, prefix=prefix, host=host, base_port=base_port, ports=ports,
        cpus=cpus,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evc_sim --devices N --root DIR --state-file FILE [--authorized-keys FILE]``."""
    p = argparse.ArgumentParser(prog="python -m evc_sim", description=__doc__.splitlines()[0])
    p.add_argument("--devices", "-n", type=int, default=3, help="how many devices")
    p.add_argument("--root", type=Path, required=True, help="simulator state directory")
    p.add_argument("--state-file", type=Path, default=None, help="device list (JSON)")
    p.add_argument("--authorized-keys", type=Path, default=None, help="public keys to authorize")
    p.add_argument("--privileges", default="user", help="comma-separated levels to cycle through")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--base-port", type=int, default=0, help="first port (0: free ports)")
    p.add_argument("--cpus", default="", help="real CPU limits cycled over the devices, e.g. 0.25,0.5,1 (root)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    privileges = [x for x in args.privileges.split(",") if x]
    try:
        serve_forever(
            args.devices, args.root, args.state_file or args.root / "devices.json",
            args.authorized_keys, privileges,
            prefix=args.prefix, host=args.host, base_port=args.base_port,
            cpus=cpuquota.parse_cpus_list(args.cpus),
        )  # fmt: skip
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 2
    return 0
