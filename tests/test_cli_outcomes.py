"""Exit codes that mean what they say (issue 11.3): level jobs end ``partial`` or ``failed``
with per-device reasons, and `cluster level`, `cluster add` and the `fl` commands exit non-zero
when what was asked did not happen. Real API over HTTP, a real worker, simulated devices."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.fixtures.cli import evc
from tests.fixtures.fleet import DIRECT_VARS, create_cluster, register_devices

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_level_jobs_end_partial_or_failed_and_the_cli_exits_non_zero(
    live: str,
    api: Any,
    worker: Any,
    sim_devices: Any,
) -> None:
    a, b = register_devices(api, sim_devices(2, privilege="user"))
    cl = create_cluster(api, f"exit{time.time_ns()}", "direct", vars=DIRECT_VARS)
    for dev in (a, b):
        status, out = api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev})
        assert status == 202 and out["job"] is None, out
    api.store.update_device(b, state="offline")
    # one of two reaches L1: the job is partial, the command fails, the reason is per device
    code, stdout, _ = evc(live, api.admin, "--json", "cluster", "level", cl["id"], "1")
    job = json.loads(stdout)
    assert code == 1 and job["state"] == "partial", job
    assert job["results"][a]["level"] == 1 and "offline" in job["results"][b]["stopped"]
    assert job["summary"]["reached"] == 1 and b in job["summary"]["stopped"]
    # none reaches it: failed, not succeeded
    api.store.update_device(a, state="offline")
    code, stdout, both = evc(live, api.admin, "cluster", "level", cl["id"], "1")
    assert code == 1 and "failed" in both and "no device reached L1" in both, both
    # everyone there: exit 0
    api.store.update_device(a, state="online")
    api.store.update_device(b, state="online")
    code, _, both = evc(live, api.admin, "cluster", "level", cl["id"], "1")
    assert code == 0 and "succeeded" in both, both
    # `cluster add`: the join job's device cannot reach the cluster's level -> exit 1
    status, _ = api.call("DELETE", f"/api/v1/clusters/{cl['id']}/devices/{b}")
    assert status == 202
    api.store.update_device(b, state="offline")
    cl2 = create_cluster(api, f"exit2{time.time_ns()}", "direct", target=1, vars=DIRECT_VARS)
    code, _, both = evc(live, api.admin, "cluster", "add", cl2["id"], b)
    assert code == 1 and "offline" in both, both


def test_fl_install_exits_non_zero_with_each_devices_reason(
    live: str,
    api: Any,
    worker: Any,
    sim_devices: Any,
) -> None:
    (a,) = register_devices(api, sim_devices(1, privilege="user"))
    code, _, both = evc(live, api.admin, "fl", "install", "--device", a, "--python", "/nonexistent/python3")
    assert code == 1 and "cannot run the FL client" in both and "failed" in both, both


def test_fl_partition_exits_non_zero_when_a_shard_is_not_pushed(
    live: str,
    api: Any,
    worker: Any,
    simulator: Any,
    sim_devices: Any,
) -> None:
    devs = sim_devices(2, privilege="user")
    a, b = register_devices(api, devs)
    # no device can take its shard (the path cannot be written): the job fails, exit 1
    code, _, both = evc(live, api.admin, "fl", "partition", "--device", a, "--path", "/proc/evc-nowhere/{dataset}.npz")
    assert code == 1 and "failed" in both and "no shard could be pushed" in both, both
    assert a in both or devs[0].name in both, both  # the table names the device and why
    # one of two devices is down: the job is partial, still exit 1
    simulator.set_fault(devs[1].name, "down")
    code, stdout, both = evc(live, api.admin, "--json", "fl", "partition", "--device", a, "--device", b)
    job = json.loads(stdout)
    assert code == 1 and job["state"] == "partial", job
    assert job["results"][a]["ok"] is True and job["results"][b]["ok"] is False, job["results"]
    assert job["summary"]["pushed"] == 1, job  # (success, exit 0: tests/test_fl_out_of_the_box.py)
