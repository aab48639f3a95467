"""The store's Redis client translates outages once: a Redis that cannot answer raises
StoreUnavailable from a plain command, a pipeline and a Lua script; a refused command does not.
No server needed: the client points at a port nobody listens on."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from evc.errors import StoreUnavailable
from evc.settings import load_settings
from evc.store import Store, redis_client
from evc.store.client import StoreRedis, unavailable


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture()
def down(closed_port: int) -> Store:
    client = redis.Redis(port=closed_port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    return Store(client, prefix="down")  # a plain client: the store wraps it


def test_a_plain_command_raises_store_unavailable(down: Store) -> None:
    with pytest.raises(StoreUnavailable) as err:
        down.get_job("job_0000000000000001")
    assert isinstance(err.value.__cause__, redis.ConnectionError)
    assert err.value.status == 503 and err.value.retryable


def test_a_pipeline_raises_store_unavailable(down: Store) -> None:
    with pytest.raises(StoreUnavailable):
        down.hit_many(["a", "b"], 60)
    uow = down.unit_of_work()
    down.audit("someone", "POST /x", pipe=uow)
    with pytest.raises(StoreUnavailable):
        uow.execute()


def test_a_script_raises_store_unavailable(down: Store) -> None:
    with pytest.raises(StoreUnavailable):
        down.transition_job("job_0000000000000001", "failed", ["queued"])
    with pytest.raises(StoreUnavailable):
        down.expired_leases()


def test_a_script_on_a_pipeline_raises_store_unavailable(down: Store) -> None:
    with pytest.raises(StoreUnavailable):
        down.record_health({"dev_x": {"state": "online"}})


def test_ping_says_unreachable(down: Store) -> None:
    with pytest.raises(StoreUnavailable, match="Redis is unreachable"):
        down.ping()


@pytest.mark.parametrize(
    ("raised", "seen"),
    [
        (redis.ConnectionError("refused"), StoreUnavailable),
        (redis.TimeoutError("slow"), StoreUnavailable),
        (redis.BusyLoadingError("loading"), StoreUnavailable),
        (redis.ResponseError("WRONGTYPE"), redis.ResponseError),  # refused: a bug, not an outage
        (redis.exceptions.NoScriptError("NOSCRIPT"), redis.exceptions.NoScriptError),  # scripts load on it
    ],
)
def test_what_is_translated(raised: redis.RedisError, seen: type[Exception]) -> None:
    class Raising(redis.Redis):
        def execute_command(self, *args: object, **options: object) -> object:
            raise raised

    class Client(StoreRedis, Raising):
        pass

    with pytest.raises(seen) as err:
        Client().get("k")
    if seen is StoreUnavailable:
        assert err.value.__cause__ is raised and str(raised) in str(err.value)
    assert not isinstance(unavailable(raised), redis.RedisError)


def test_url_and_sentinel_clients_translate(closed_port: int, tmp_path) -> None:
    s = load_settings(env={}, data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{closed_port}/0")
    assert isinstance(redis_client(s), StoreRedis)
    sentinel = s.replace(redis_sentinels=f"127.0.0.1:{closed_port}", redis_url="")
    client = redis_client(sentinel)
    assert isinstance(client, StoreRedis)
    t = time.monotonic()
    with pytest.raises(StoreUnavailable):  # no sentinel answers: no master
        Store(client, "down").get_device("dev_x")
    with pytest.raises(StoreUnavailable):  # a pipeline
        Store(client, "down").hit("x", 60)
    assert time.monotonic() - t < 30


def test_no_redis_configured(tmp_path) -> None:
    with pytest.raises(StoreUnavailable, match="no Redis URL"):
        redis_client(load_settings(env={}, data_dir=tmp_path, redis_url=""))
