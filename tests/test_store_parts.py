"""The store's methods that replaced raw Redis calls outside it: device renames, the bootstrap
claim, plain counters, the unit of work. Real Redis (the session's)."""

from __future__ import annotations

from typing import cast

import pytest
import redis

from evc.errors import Conflict
from evc.model import Device
from evc.store import Store, new_id, now

pytestmark = [pytest.mark.integration]


def test_rename_device_moves_its_name_index(store: Store, redis_raw: redis.Redis, flush: None) -> None:
    a = store.create_device(cast(Device, {"id": new_id("dev"), "name": "alpha", "created_at": now()}), "hash-a")
    store.create_device(cast(Device, {"id": new_id("dev"), "name": "beta", "created_at": now()}), "hash-b")
    with pytest.raises(Conflict, match="'beta' is already registered"):
        store.rename_device(a["id"], "alpha", "beta")
    assert store.device_id_by_name("alpha") == a["id"]
    store.rename_device(a["id"], "alpha", "gamma")
    assert store.device_id_by_name("gamma") == a["id"] and store.device_id_by_name("alpha") is None


def test_bootstrap_is_claimed_once(store: Store, flush: None) -> None:
    assert store.claim_bootstrap() and not store.claim_bootstrap()


def test_incr_counts_under_the_prefix(store: Store, redis_raw: redis.Redis, flush: None) -> None:
    assert [store.incr("things"), store.incr("things")] == [1, 2]
    assert int(redis_raw.get(store.k("things")) or 0) == 2


def test_unit_of_work_writes_nothing_until_executed(store: Store, flush: None) -> None:
    before = store.audit_log(0, 1)[1]
    uow = store.unit_of_work()
    store.audit("tester", "POST /x", pipe=uow)
    assert store.audit_log(0, 1)[1] == before
    uow.reset()
    assert store.audit_log(0, 1)[1] == before
    uow = store.unit_of_work()
    store.audit("tester", "POST /y", pipe=uow)
    uow.execute()
    assert store.audit_log(0, 1)[0][0]["action"] == "POST /y"


def test_commit_as_token_writes_what_the_pipeline_would(store: Store, redis_raw: redis.Redis, flush: None) -> None:
    """A cached token's commit sends the unit of work as one JSON argument: every word arrives
    byte for byte as the pipeline itself would send it (quotes, backslashes, control and
    non-ASCII characters, numbers as their repr); a changed token writes nothing."""
    from evc.auth import hash_token

    token = {"id": "tok_c", "scopes": ["admin"], "expires_at": None, "revoked": False, "name": "c"}
    store.create_token(token, hash_token("evco_c"))  # type: ignore[arg-type]
    words = ['a"b\\c', "line\nfeed\t\x00\x1f", "é€😀", '{"k": [1, 2.5]}', ""]
    for key, cached in (("via-script", True), ("via-pipeline", False)):
        uow = store.unit_of_work()
        uow.hset(store.k(key), mapping={f"f{i}": w for i, w in enumerate(words)})
        uow.zadd(store.k(key, "z"), {"m": 1780000000.123456, "n": 1e-7})
        uow.lpush(store.k(key, "l"), *words)
        uow.ltrim(store.k(key, "l"), 0, 999)
        if cached:
            assert store.commit_as_token(uow, hash_token("evco_c"), token)
        else:
            uow.execute()
    for suffix in ("", ":z", ":l"):
        a, b = store.k("via-script") + suffix, store.k("via-pipeline") + suffix
        assert redis_raw.dump(a) == redis_raw.dump(b), suffix
    store.update_token("tok_c", revoked=True)
    uow = store.unit_of_work()
    uow.set(store.k("never"), "x")
    assert not store.commit_as_token(uow, hash_token("evco_c"), token)
    assert not redis_raw.exists(store.k("never")) and len(uow.command_stack) == 1
    uow.reset()
