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
