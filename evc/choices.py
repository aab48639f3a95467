"""The fixed sets of names the API and the CLI offer as choices, in one light module.

The CLI builds its ``click.Choice`` lists at start-up; importing the modules that act on these
names would load numpy and redis into every command, so the names live here (built from the
enums of :mod:`evc.model`, stdlib only) and those modules take them from here. The FL strategies
are the one registry with code behind each name (:data:`evc.fl.strategy.STRATEGIES`):
tests/test_choices.py checks it is keyed by exactly these. Cluster profiles come from their own
registry (:func:`evc.profiles.names`)."""

from __future__ import annotations

from evc.model import HostStatus, OfflinePolicy, Scope, strings

#: federated aggregation strategies, in the order they are offered
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
#: how ``fl partition`` splits a dataset over devices
PARTITIONS = ("iid", "dirichlet")
#: operator token scopes (``admin`` implies every scope)
SCOPES: tuple[str, ...] = strings(*Scope)
#: the host outcomes a provision retry re-runs
RETRYABLE: tuple[str, ...] = strings(HostStatus.FAILED, HostStatus.UNREACHABLE)
#: a device locked by another job: wait behind it, or refuse at once
LOCK_MODES = ("wait", "fail")
#: a level job's offline members: skip them, fail the job, or wait for them
OFFLINE_POLICIES: tuple[str, ...] = strings(*OfflinePolicy)

__all__ = ["LOCK_MODES", "OFFLINE_POLICIES", "PARTITIONS", "RETRYABLE", "SCOPES", "STRATEGIES"]
