"""The `evc` command: run the stack (`evc up`), the simulator, and drive the HTTP API.

One module per command group, each registering its commands on the root group :func:`main`
(in :mod:`evc.cli.common`, with the context every command shares); :mod:`evc.cli.format`
and :mod:`evc.cli.views` show the API's JSON to a person.
"""

from __future__ import annotations

import evc.cli.infer_collab  # noqa: F401  (`evc infer joint|split`)

# the command groups register their commands on `main` as they are imported
from evc.cli import (  # noqa: F401
    clusters,
    deployments,
    devices,
    fl,
    fleet,
    infer,
    jobs,
    models,
    monitoring,
    provision,
    sim,
    stack,
    tokens,
)

# isort: split
from evc.cli import recommend  # noqa: F401  (model profile and recommend, device calibrate: after models)
from evc.cli.common import main

__all__ = ["main"]
