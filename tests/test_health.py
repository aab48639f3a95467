"""Unit tests of the pure health core: parsing the check's output and the state machine."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys

import pytest

from evc import pool as pooling
from evc.errors import SSHTimeout, Unreachable
from evc.health import (
    CHECK,
    HealthPolicy,
    Observation,
    assess,
    breaches,
    cpus_of,
    parse_health,
    verified,
    webhook_body,
)
from evc.settings import Settings
from tests.fixtures.helpers import present

SAMPLE = """load=0.52 0.41 0.30
uptime=123456.78
mem.MemTotal=4030988
mem.MemFree=1234
mem.MemAvailable=1007747
mem.Buffers=100
mem.Cached=2000
temp=45500
temp=61250
df:
Filesystem     1024-blocks     Used Available Capacity Mounted on
/dev/mmcblk0p1    30000000 20000000   5000000      80% /
"""

POLICY = HealthPolicy(degraded_after=1, offline_after=3, recover_after=2, load_per_cpu_threshold=4.0)
OK = Observation(True, {"load1": 0.5, "mem_used_ratio": 0.3, "disk_used_ratio": 0.5})
MISS = Observation.failed(SSHTimeout("no answer", device_id="dev_1"))


# ---------------------------------------------------------------------- parsing
def test_parse_sample() -> None:
    m = parse_health(SAMPLE)
    assert (m["load1"], m["load5"], m["load15"]) == (0.52, 0.41, 0.30)
    assert m["uptime_s"] == 123456.78
    assert m["mem_used_ratio"] == pytest.approx(0.75, abs=1e-3)
    assert m["disk_used_ratio"] == pytest.approx(0.8)  # used / (used + available), like df
    assert m["temperature_c"] == pytest.approx(61.25, abs=0.06)  # the hottest zone


def test_parse_without_memavailable_uses_free_buffers_cached() -> None:
    text = "mem.MemTotal=1000\nmem.MemFree=100\nmem.Buffers=50\nmem.Cached=250\n"
    assert parse_health(text)["mem_used_ratio"] == pytest.approx(0.6)


def test_parse_missing_and_garbage_are_none() -> None:
    m = parse_health("load=abc\nnonsense\ntemp=\ndf:\nonly a header\n")
    assert all(v is None for v in m.values())
    assert parse_health("")["load1"] is None


def test_parse_filesystem_name_with_spaces() -> None:
    text = "df:\nFilesystem 1024-blocks Used Available Capacity Mounted on\nmy disk 100 25 75 25% /\n"
    assert parse_health(text)["disk_used_ratio"] == 0.25


def test_check_script_runs_under_posix_sh_here() -> None:
    out = subprocess.run(["/bin/sh", "-c", CHECK], capture_output=True, text=True, check=True).stdout
    m = parse_health(out)
    assert m["load1"] is not None and m["uptime_s"] is not None
    assert 0.0 <= m["mem_used_ratio"] <= 1.0
    assert 0.0 <= m["disk_used_ratio"] <= 1.0


# ---------------------------------------------------------------------- thresholds
def test_breaches_name_each_threshold() -> None:
    over = breaches({"load1": 9.0, "mem_used_ratio": 0.99, "disk_used_ratio": 0.1, "temperature_c": 90}, POLICY)
    assert len(over) == 3 and over[0].startswith("load 9")
    assert breaches({"load1": None}, POLICY) == []


def test_load_threshold_is_per_cpu() -> None:
    p = HealthPolicy(load_per_cpu_threshold=2.0)
    busy = {"load1": 6.0}
    assert breaches(busy, p, cpus=4) == []  # 1.5 per CPU
    assert breaches(busy, p, cpus=2) == ["load 6 on 2 CPUs > 2 per CPU"]  # 3 per CPU
    assert breaches(busy, p) == ["load 6 on 1 CPU > 2 per CPU"]  # unknown count: one CPU
    assert assess("online", None, Observation(True, busy), p, at=1.0, cpus=8).state == "online"
    assert assess("online", None, Observation(True, busy), p, at=1.0, cpus=2).state == "degraded"


def test_cpu_count_comes_from_the_facts() -> None:
    assert cpus_of({"facts": {"cpus": 6}}) == 6
    assert cpus_of({"facts": {"cpus": None}}) is None and cpus_of({}) is None
    assert cpus_of({"facts": {"cpus": 0}}) is None and cpus_of({"facts": {"cpus": "4"}}) is None


def test_load_threshold_setting_is_per_cpu() -> None:
    assert HealthPolicy.from_settings(Settings(health_load_per_cpu_threshold=1.5)).load_per_cpu_threshold == 1.5


def test_policy_from_settings() -> None:
    p = HealthPolicy.from_settings(Settings(health_offline_after=5, health_recover_after=0))
    assert p.offline_after == 5 and p.recover_after == 1  # at least one good check


# ---------------------------------------------------------------------- the state machine
def run(state: str, observations: list[Observation], policy: HealthPolicy = POLICY) -> list[str]:
    health = None
    states = []
    for i, obs in enumerate(observations):
        a = assess(state, health, obs, policy, at=float(i))
        state, health = a.state, a.health
        states.append(state)
    return states


def test_misses_degrade_then_offline() -> None:
    assert run("online", [MISS, MISS, MISS, MISS]) == ["degraded", "degraded", "offline", "offline"]


def test_degraded_after_more_than_one_miss() -> None:
    p = HealthPolicy(degraded_after=2, offline_after=4)
    assert run("online", [MISS, MISS, MISS, MISS], p) == ["online", "degraded", "degraded", "offline"]


def test_success_resets_misses() -> None:
    assert run("online", [MISS, MISS, OK, MISS, MISS]) == ["degraded", "degraded", "online", "degraded", "degraded"]


def test_hysteresis_leaving_offline_takes_recover_after_successes() -> None:
    states = run("online", [MISS, MISS, MISS, OK, MISS, OK, OK, OK])
    assert states == ["degraded", "degraded", "offline", "offline", "offline", "offline", "online", "online"]


def test_recover_after_one_leaves_offline_at_once() -> None:
    p = HealthPolicy(recover_after=1)
    assert run("offline", [OK], p) == ["online"]


def test_threshold_breach_is_degraded_and_clears() -> None:
    hot = Observation(True, {"load1": 0.1, "temperature_c": 95.0})
    a = assess("online", None, hot, POLICY, at=1.0)
    assert a.state == "degraded" and a.changed and "temperature 95" in a.reason
    b = assess(a.state, a.health, OK, POLICY, at=2.0)
    assert b.state == "online" and b.reason == "recovered"


def test_unknown_states_count_as_offline() -> None:
    a = assess("unreachable", None, OK, POLICY, at=1.0)
    assert a.state == "offline" and a.previous == "unreachable" and a.changed
    assert "recovering" in a.reason


def test_health_record_fields() -> None:
    a = assess("online", None, Observation(True, parse_health(SAMPLE)), POLICY, at=10.0)
    h = a.health
    assert h["misses"] == 0 and h["ok_streak"] == 1 and h["checked_at"] == 10.0 and h["error"] is None
    assert h["load1"] == 0.52 and h["source"] == "ssh"
    b = assess(a.state, h, Observation.failed(Unreachable("refused")), POLICY, at=11.0)
    assert b.health["misses"] == 1 and b.health["ok_streak"] == 0
    assert present(b.health["error"])["reason"] == "unreachable"
    assert b.health["load1"] == 0.52  # the last known metrics stay
    assert b.reason == "unreachable: 1 consecutive missed check"
    assert not assess("online", None, OK, POLICY, at=1.0).changed


def test_heartbeat_reason() -> None:
    hb = Observation(True, {"load1": 0.1}, source="heartbeat")
    a = assess("offline", {"misses": 5}, hb, HealthPolicy(recover_after=1), at=1.0)
    assert a.state == "online" and a.reason == "heartbeat: recovered"


def test_webhook_body() -> None:
    body = webhook_body([{"device": "dev_1", "name": "edge-1", "from": "online", "to": "offline", "reason": "timeout"}])
    assert body["text"] == "edge-1: online → offline (timeout)" and len(body["events"]) == 1


# ---------------------------------------------------------------------- the per-process loop
def test_importing_the_pool_starts_nothing() -> None:
    code = "import threading, evc.pool, evc.health, evc.tasks.health; print(threading.active_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def _in_child() -> tuple[int, int, int]:
    loop = pooling.process_loop()
    return os.getpid(), loop.pid, pooling.call(asyncio.sleep(0, result=42))


def test_a_forked_child_starts_its_own_loop() -> None:
    parent = pooling.process_loop()
    assert pooling.call(asyncio.sleep(0, result=1)) == 1 and parent.pid == os.getpid()
    with multiprocessing.get_context("fork").Pool(1) as p:
        child_pid, loop_pid, value = p.apply(_in_child)
    assert child_pid != os.getpid() and loop_pid == child_pid and value == 42
    assert pooling.process_loop() is parent  # the parent's loop is untouched


def test_shutdown_stops_the_loop_and_a_later_call_starts_another() -> None:
    first = pooling.process_loop()
    pooling.shutdown()
    assert not first.thread.is_alive()
    assert pooling.call(asyncio.sleep(0, result=3)) == 3 and pooling.process_loop() is not first


# ---------------------------------------------------------------------- a verified probe (re-pin)
def test_verified_probe_ends_the_misses_without_hysteresis() -> None:
    gone = {"misses": 5, "ok_streak": 0, "error": {"reason": "host_key_mismatch"}, "load1": 0.3}
    a = verified("offline", gone, at=7.0)
    assert a.state == "online" and a.changed and a.health["misses"] == 0 and a.health["error"] is None
    assert a.health["load1"] == 0.3 and a.health["checked_at"] == 7.0 and a.health["source"] == "probe"
    # one miss after it counts from one: degraded, not offline again
    assert assess(a.state, a.health, MISS, POLICY, at=8.0).state == "degraded"
    assert assess("offline", gone, MISS, POLICY, at=8.0).state == "offline"  # without it


def test_verified_probe_keeps_a_threshold_breach() -> None:
    full = {"misses": 0, "breaches": ["disk 99% used > 95%"]}
    assert verified("degraded", full, at=1.0).state == "degraded"
    assert verified("degraded", {**full, "misses": 1}, at=1.0).state == "online"  # degraded by a miss
    assert not verified("online", {"misses": 0}, at=1.0).changed
