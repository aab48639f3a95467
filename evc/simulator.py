"""Where the simulator comes from: not this package.

The simulated devices and the test OpenSSH launcher are a distribution of their own, ``evc-sim``
(the repository's ``sim/`` folder, package ``evc_sim``), kept out of the ``evc`` wheel and the
container image. ``scripts/bootstrap`` (so ``scripts/up`` and ``scripts/test``) installs it next
to EVC; ``evc sim`` and ``evc up --sim N`` import it lazily, after :func:`require`.
"""

from __future__ import annotations

import importlib.util

from evc.errors import ConfigError

PACKAGE = "evc_sim"
NOT_INSTALLED = "the simulator is not installed: pip install ./sim (scripts/up does it)"


def installed() -> bool:
    """Whether ``evc_sim`` can be imported here."""
    return importlib.util.find_spec(PACKAGE) is not None


def require() -> None:
    """Raise ConfigError (the CLI prints it and exits with status 2) unless the simulator is installed."""
    if not installed():
        raise ConfigError(NOT_INSTALLED)
