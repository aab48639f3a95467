"""The FL round engine's pure parts: who sits a round out, and a closed round's record."""

from __future__ import annotations

from typing import Any

from evc.fl.aggregation import round_message, round_record
from evc.fl.channels import how_it_ended
from evc.fl.jobspec import eligibility, health_detail
from evc.fl.orchestrator import DEGRADED, sit_outs
from evc.model import FLState


def dev(i: str, state: str = "online", level: int = 4) -> dict:
    return {"id": i, "state": state, "level": level}


def test_removed_and_ineligible_devices_sit_out() -> None:
    devices = {"a": dev("a"), "b": dev("b", level=1), "c": dev("c", state="offline")}
    out = sit_outs(["a", "b", "c", "gone"], devices, min_available=1)
    assert set(out) == {"b", "c", "gone"}
    assert out["gone"] == "the device was removed" and out["c"] == "the device is offline"
    assert "FL client is not installed" in out["b"]


def test_degraded_devices_make_up_the_number_in_job_order() -> None:
    devices = {"a": dev("a"), "b": dev("b", "degraded"), "c": dev("c", "degraded"), "d": dev("d", "degraded")}
    order = ["a", "b", "c", "d"]
    assert sit_outs(order, devices, min_available=1) == dict.fromkeys(["b", "c", "d"], DEGRADED)
    assert sit_outs(order, devices, min_available=3) == {"d": DEGRADED}
    assert sit_outs(order, devices, min_available=9) == {}


def test_round_record_and_message() -> None:
    st: FLState = {"round": 3, "started_at": 100.0, "skipped": {"z": "offline"}, "dispatches": 2}
    outcomes: dict[str, dict[str, Any]] = {
        "a": {"ok": True, "t0": 101.0, "t1": 104.0, "seconds": 3.0},
        "b": {"ok": True, "t0": 102.0, "t1": 103.0, "seconds": 1.0},
        "c": {"ok": False, "reason": "timeout"},
    }
    metrics = {"clients": ["a", "b"], "num_clients": 2, "num_examples": 40, "failures": {"c": "timeout"}}
    rec = round_record(st, ["a", "b", "c"], outcomes, metrics, 1, 106.0)
    assert rec["round"] == 3 and rec["duration_s"] == 6.0 and rec["client_starts"] == 1
    assert rec["timing"] == {"first_fit_s": 1.0, "last_fit_s": 4.0, "slowest_fit_s": 3.0}
    assert rec["skipped"] == {"z": "offline"} and rec["dispatches"] == 2 and rec["eval_accuracy"] is None
    assert round_message(rec, 3) == "round 3: 2 of 3 devices, 1 failed (6000 ms)"
    rec["eval_accuracy"] = 0.91234
    assert round_message(rec, 3) == "round 3: 2 of 3 devices, accuracy 0.9123, 1 failed (6000 ms)"
    no_skipped: FLState = {**st, "skipped": None}  # type: ignore[typeddict-item]  # as an older state had it
    assert round_record(no_skipped, [], {}, metrics, 0, 100.5)["timing"] == {}


def test_a_store_outage_is_retried_not_recorded_as_the_jobs_error() -> None:
    """recover() records an EVC error per job and goes on, but a Redis outage is transient:
    it reaches the task (which retries) instead of becoming the job's error."""
    import pytest

    from evc.errors import NotFound, StoreUnavailable
    from evc.fl.orchestrator import Rounds
    from evc.settings import Settings

    class Down:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def fl_active_jobs(self) -> list[str]:
            return ["job_a"]

        def get_job(self, job_id: str) -> dict:
            raise self.exc

    with pytest.raises(StoreUnavailable):
        Rounds(Down(StoreUnavailable("Redis is unreachable")), Settings(), None).recover(None)  # type: ignore[arg-type]
    out = Rounds(Down(NotFound("job job_a not found")), Settings(), None).recover(None)  # type: ignore[arg-type]
    assert out["job_a"].startswith("error:")


def test_a_signal_is_named_not_an_exit_status() -> None:
    """Issue 16.2: a client killed by a signal says so (SSH's exit-signal, or a shell's 128+n)."""
    assert how_it_ended(-1, ("KILL", False, "", "")) == "killed by SIGKILL — out of memory?"
    assert how_it_ended(None, "SEGV") == "killed by SIGSEGV"
    assert how_it_ended(137) == "killed by SIGKILL — out of memory?"
    assert how_it_ended(143) == "killed by SIGTERM"
    assert how_it_ended(3) == "exit status 3" and how_it_ended(None) == "ended without an exit status"


def test_health_exclusions_say_why() -> None:
    """Issue 16.2: a device sitting a round out for its health is named with what the checks said."""
    degraded = {**dev("a", "degraded"), "health": {"breaches": ["load 3.1 per CPU > 2.0"], "misses": 0}}
    offline = {**dev("b", "offline"), "health": {"misses": 3, "error": {"reason": "unreachable", "message": "refused"}}}
    fleet = {"a": degraded, "b": offline, "c": dev("c")}
    out = sit_outs(["a", "b", "c"], fleet, min_available=1)
    assert out == {
        "a": "the device is degraded (load 3.1 per CPU > 2.0)",
        "b": "the device is offline (3 missed health checks (unreachable: refused))",
    }
    assert sit_outs(["a", "b", "c"], fleet, min_available=2) == {"b": out["b"]}  # degraded makes up the number
    assert health_detail(None) == "" and eligibility(dev("c")) is None
