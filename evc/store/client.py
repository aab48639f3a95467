"""The store's Redis client: the one place a Redis error becomes :class:`StoreUnavailable`.

Every command, pipeline and script call of the store runs through :class:`StoreRedis` (a plain
client's command) or :class:`StorePipeline` (a pipeline's execution; scripts queued on it are
loaded there too). A connection error, a timeout, a Redis still loading its data, a Sentinel
with no master... any :class:`redis.RedisError` but a command's refusal
(:class:`redis.ResponseError`: WRONGTYPE, NOSCRIPT, a script's error) is raised as
:class:`~evc.errors.StoreUnavailable` (HTTP 503, retried by tasks), its cause chained."""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline

from evc.errors import StoreUnavailable
from evc.settings import Settings

#: Redis errors that are answers, not outages: a refused command (its caller's bug, or a script's
#: reply) and a WATCHed key that changed (the caller's optimistic lock to retry)
_ANSWERS = (redis.ResponseError, redis.WatchError)


def unavailable(exc: redis.RedisError) -> StoreUnavailable:
    """The store's error for a Redis that cannot answer (chain *exc* as its cause)."""
    return StoreUnavailable(f"Redis is unavailable: {exc}")


class StorePipeline(Pipeline):
    """A pipeline whose execution raises :class:`StoreUnavailable` for an outage."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except _ANSWERS:
            raise
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        """A command run at once (while WATCHing)."""
        try:
            return super().immediate_execute_command(*args, **options)
        except _ANSWERS:
            raise
        except redis.RedisError as exc:
            raise unavailable(exc) from exc


class StoreRedis(redis.Redis):
    """A Redis client whose commands raise :class:`StoreUnavailable` for an outage, and whose
    pipelines are :class:`StorePipeline`."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute_command(*args, **options)
        except _ANSWERS:
            raise
        except redis.RedisError as exc:
            raise unavailable(exc) from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> StorePipeline:
        return StorePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def store_client(client: redis.Redis) -> StoreRedis:
    """*client* as a :class:`StoreRedis` (one sharing its connection pool when it is not)."""
    if isinstance(client, StoreRedis):
        return client
    return StoreRedis(connection_pool=client.connection_pool)


def redis_client(settings: Settings) -> StoreRedis:
    """A Redis client for *settings*: a URL, or Sentinel when sentinels are configured."""
    if settings.redis_sentinels:
        from redis.sentinel import Sentinel

        hosts = []
        for hp in settings.redis_sentinels.split(","):
            h, _, p = hp.strip().rpartition(":")
            hosts.append((h, int(p)))
        # the master's password and database ride in EVC_REDIS_URL (redis://:PASSWORD@any/DB)
        opts = redis.connection.parse_url(settings.redis_url) if settings.redis_url else {}
        master = Sentinel(hosts, password=opts.get("password")).master_for(
            settings.redis_sentinel_master, redis_class=StoreRedis, db=int(opts.get("db") or 0)
        )
        return store_client(master)
    if not settings.redis_url:
        raise StoreUnavailable("no Redis URL configured (set EVC_REDIS_URL or run `evc up`)")
    return store_client(StoreRedis.from_url(settings.redis_url, health_check_interval=30))
