"""Redis Sentinel with a password: the store and the Celery broker find the master through a
real redis-server running in sentinel mode."""

from __future__ import annotations

import subprocess
import time

import pytest
from evc.workers.celery_app import make_celery

from evc.embedded import RedisServer, free_port, redis_server_binary
from evc.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture()
def sentinel(tmp_path):
    master = RedisServer(tmp_path / "master", password="pw:s3cret").start()
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor evcmaster 127.0.0.1 {master.port} 1\n"
        f"sentinel auth-pass evcmaster pw:s3cret\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    yield master, port
    proc.terminate()
    proc.wait(10)
    master.stop()


def test_store_and_broker_through_sentinel_with_password(settings, sentinel) -> None:
    master, port = sentinel
    s = settings.replace(
        redis_url="redis://:pw%3As3cret@sentinel/3",
        redis_sentinels=f"127.0.0.1:{port}",
        redis_sentinel_master="evcmaster",
        key_prefix="sent",
    )
    store = Store.from_settings(s)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert store.ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    store.put_json("probe", {"ok": True})
    direct = RedisServer(master.data_dir, port=master.port, password=master.password)
    import redis

    r = redis.Redis.from_url(direct.url.replace("/0", "/3"))
    assert r.get("sent:probe") == b'{"ok": true}'  # the master, database 3
    app = make_celery(s, include_tasks=False)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        app.send_task("evc.noop", args=["job_x"], queue="default", connection=conn)
    assert r.llen("default") == 1
