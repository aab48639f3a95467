"""The one package that talks to Redis: devices, clusters, tokens, jobs and their events, logs,
federated learning, the model registry, deployments, locks, console sessions.

:class:`Store` is the facade the rest of EVC uses, composed of one part per aggregate (each in
its own module, sharing :class:`~evc.store._base.StoreBase`). Its Redis client is private, and
every Redis outage surfaces as :class:`~evc.errors.StoreUnavailable` (see
:mod:`evc.store.client`)."""

from __future__ import annotations

from evc.settings import Settings
from evc.store._base import ID_RE, JSON, StoreBase, new_id, now
from evc.store.client import redis_client
from evc.store.clusters import ClusterStore
from evc.store.deployments import DeploymentStore
from evc.store.devices import DeviceStore
from evc.store.fl import FLStore
from evc.store.fleet import FleetLogStore
from evc.store.inference import InferenceStore
from evc.store.jobs import JOB_STATES, TERMINAL_STATES, JobStore
from evc.store.locks import LockStore
from evc.store.models import ModelStore
from evc.store.profiles import ProfileStore
from evc.store.sessions import SessionStore
from evc.store.tokens import TokenStore

__all__ = ["ID_RE", "JOB_STATES", "JSON", "TERMINAL_STATES", "Store", "new_id", "now", "redis_client"]


class Store(
    DeviceStore, ClusterStore, TokenStore, JobStore, FleetLogStore, FLStore, ModelStore, DeploymentStore, LockStore,
    SessionStore, InferenceStore, ProfileStore, StoreBase,
):  # fmt: skip
    """Typed access to EVC's state in Redis. Build one per process with :meth:`from_settings`."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(redis_client(settings), settings.key_prefix, settings)
