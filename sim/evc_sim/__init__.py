"""Simulated edge devices: real asyncssh SSH servers on loopback that run commands for real.

``Simulator`` (asyncio) and ``SimulatorThread`` (synchronous) serve a fleet in one process;
``serve_forever`` / ``run_simulator`` / ``main`` run one as a process that lists its devices in a
JSON state file. See :mod:`evc_sim.server` for the layout and :mod:`evc_sim.accounts` for how
the three privilege levels are presented.
"""

import evc  # noqa: F401 - first: its warning filter (cryptography's DSA deprecation) precedes asyncssh's import
from evc_sim.device import (
    FAULT_MODES,
    PRIVILEGES,
    FaultMode,
    Privilege,
    SimDevice,
    read_state,
    write_state,
)
from evc_sim.runner import (
    SimulatorThread,
    main,
    read_keys_file,
    run_simulator,
    serve,
    serve_forever,
)
from evc_sim.server import Simulator, raise_fd_limit

__all__ = [
    "FAULT_MODES",
    "PRIVILEGES",
    "FaultMode",
    "Privilege",
    "SimDevice",
    "Simulator",
    "SimulatorThread",
    "main",
    "raise_fd_limit",
    "read_keys_file",
    "read_state",
    "run_simulator",
    "serve",
    "serve_forever",
    "write_state",
]
