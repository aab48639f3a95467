"""The parallel-inference core without services: the scheduler (chunk sizes, re-issue, dedupe,
failures) driven by a discrete-event simulation of devices of known speeds, the routing
policy, the Open Inference Protocol encoding, and data set parsing."""

from __future__ import annotations

import heapq
import io
import random

import numpy as np
import pytest

from evc.errors import ValidationError
from evc.inference import datasets
from evc.inference.oip import decode_response, encode_request, split_endpoint
from evc.inference.routing import rank
from evc.inference.schedule import Chunk, ChunkPolicy, Scheduler


def simulate(
    speeds: dict[str, float], n: int, policy: ChunkPolicy, overhead_s: float = 0.002,
    die: tuple[str, float] | None = None,
) -> tuple[float, Scheduler, list[int]]:  # fmt: skip
    """Devices answering a chunk in ``overhead + size / speed`` seconds; *die*: (device, when)
    after which that device's requests fail. Returns (makespan, scheduler, how often each item
    was recorded)."""
    sched = Scheduler(n, list(speeds), policy)
    recorded = [0] * n
    events: list[tuple[float, int, str, Chunk | None]] = []
    seq = 0
    for d in speeds:
        heapq.heappush(events, (0.0, seq, d, None))
        seq += 1
    t = 0.0
    while events and not sched.finished:
        t, _, d, chunk = heapq.heappop(events)
        if chunk is not None:
            if die and d == die[0] and t >= die[1]:
                if not sched.fail(d, chunk, t):
                    continue
            else:
                for i in sched.complete(d, chunk, t):
                    recorded[i] += 1
        nxt = sched.next(d, t)
        if nxt is None:
            if not sched.devices[d].dropped:
                heapq.heappush(events, (t + 0.01, seq, d, None))
        else:
            done_at = t + overhead_s + nxt.size / speeds[d]
            if die and d == die[0] and done_at >= die[1]:
                done_at = max(t, die[1]) + 0.001  # the connection is refused at once
            heapq.heappush(events, (done_at, seq, d, nxt))
        seq += 1
    return t, sched, recorded


SPEEDS = {"a": 100.0, "b": 100.0, "c": 200.0, "d": 400.0}  # items/s: 1:1:2:4
N = 20_000
IDEAL = N / sum(SPEEDS.values())


def test_dynamic_split_is_close_to_ideal_and_static_is_not() -> None:
    makespan, sched, recorded = simulate(SPEEDS, N, ChunkPolicy(target_s=1.0))
    assert recorded == [1] * N and sched.finished
    assert makespan <= 1.1 * IDEAL, (makespan, IDEAL)
    shares = {d: s["share"] for d, s in sched.summary().items()}
    assert shares["d"] == pytest.approx(0.5, abs=0.05) and shares["a"] == pytest.approx(0.125, abs=0.03)
    static, _, recorded = simulate(SPEEDS, N, ChunkPolicy(mode="static", max_items=500))
    assert recorded == [1] * N
    assert static == pytest.approx(N / 4 / 100.0, rel=0.05)  # the slowest device's even share
    assert makespan <= 0.6 * static


def test_chunks_follow_measured_speed_and_shrink_at_the_end() -> None:
    sched = Scheduler(100_000, ["slow", "fast"], ChunkPolicy(target_s=1.0, first_items=10, max_items=10_000))
    assert sched.chunk_size("slow") == 10  # unknown speed: the probe size
    for dev, took in (("slow", 1.0), ("fast", 0.1)):
        c = sched.next(dev, 0.0)
        assert c is not None and c.size == 10
        sched.complete(dev, c, took)
    assert sched.devices["slow"].rate == pytest.approx(10.0)
    assert sched.chunk_size("slow") == 10 and sched.chunk_size("fast") == 100
    sched.pending = [(99_000, 99_100)]  # near the end: at most half of a fair share
    assert sched.chunk_size("fast") == pytest.approx(46, abs=1)


def test_straggler_chunk_is_reissued_first_result_wins_duplicates_dropped() -> None:
    sched = Scheduler(100, ["slow", "fast"], ChunkPolicy(first_items=50, reissue=True))
    slow = sched.next("slow", 0.0)
    fast = sched.next("fast", 0.0)
    assert slow is not None and fast is not None and (slow.start, fast.start) == (0, 50)
    assert sched.complete("fast", fast, 0.1) == list(range(50, 100))
    assert sched.next("fast", 0.1) is None  # slow's chunk is not overdue yet (its rate taken as fast's)
    copy = sched.next("fast", 0.5)  # now it is: fast takes a copy of it
    assert copy is not None and (copy.start, copy.stop, copy.copy) == (0, 50, 1)
    assert sched.next("fast", 0.5) is None  # never two copies of one chunk on one device
    assert sched.complete("fast", copy, 0.6) == list(range(50))
    assert sched.finished and sched.reissued == 1
    assert sched.complete("slow", slow, 5.0) == []  # the straggler's late answer: dropped
    assert sched.duplicates == 50 and sched.devices["slow"].duplicates == 50
    assert sched.summary()["fast"]["items"] == 100


def test_no_reissue_when_the_idle_device_would_not_be_sooner() -> None:
    sched = Scheduler(20, ["a", "b"], ChunkPolicy(first_items=10))
    a, b = sched.next("a", 0.0), sched.next("b", 0.0)
    assert a is not None and b is not None
    sched.complete("a", a, 1.0)  # a: 10 items/s; b's rate unknown, taken as a's
    assert sched.next("a", 1.0) is None  # b started at 0 and should end at 1.0: no copy


def test_a_failed_device_loses_nothing_and_is_dropped_after_failures_in_a_row() -> None:
    makespan, sched, recorded = simulate(SPEEDS, N, ChunkPolicy(target_s=1.0), die=("d", IDEAL / 2))
    assert recorded == [1] * N and sched.finished
    assert sched.devices["d"].dropped and sched.requeued > 0
    # d did half of its work, the rest ran at the others' speed (400 items/s)
    assert makespan <= 1.3 * IDEAL + 0.5 * IDEAL * (800 / 400 - 1), makespan
    sched = Scheduler(10, ["a", "b"], ChunkPolicy(first_items=10, max_failures=2))
    c = sched.next("a", 0.0)
    assert c is not None and sched.fail("a", c, 0.1) is True
    c = sched.next("a", 0.2)
    assert c is not None and (c.start, c.stop) == (0, 10) and sched.fail("a", c, 0.3) is False
    assert sched.next("a", 0.4) is None and sched.live == ["b"]
    c = sched.next("b", 0.4)
    assert c is not None and sched.complete("b", c, 0.5) == list(range(10)) and sched.finished


def test_static_mode_splits_evenly_and_gives_a_dropped_share_to_the_others() -> None:
    sched = Scheduler(10, ["a", "b"], ChunkPolicy(mode="static", min_items=1, max_items=3))
    c = sched.next("a", 0.0)
    assert c is not None and (c.start, c.stop) == (0, 3)
    sched.drop("a")
    got = []
    while (c := sched.next("b", 0.0)) is not None:
        got.extend(sched.complete("b", c, 0.1))
    assert sorted(got) == list(range(10))


def test_policy_and_scheduler_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        ChunkPolicy(mode="round-robin")
    with pytest.raises(ValueError):
        ChunkPolicy(min_items=10, max_items=5)
    with pytest.raises(ValueError):
        Scheduler(5, ["a", "a"])
    assert Scheduler(0, ["a"]).finished


def test_rank_prefers_idle_fast_devices_and_puts_recent_failures_last() -> None:
    loads = {"busy": (3, 0.01, None), "slow": (0, 0.1, None), "fast": (0, 0.01, None), "broken": (0, 0.001, 99.0)}
    order = rank(["busy", "slow", "fast", "broken"], loads, at=100.0, rng=random.Random(1))
    assert order == ["fast", "busy", "slow", "broken"]
    assert rank(["broken"], loads, at=200.0) == ["broken"]  # its failure is old now
    firsts = {rank(["x", "y"], {}, at=0.0, rng=random.Random(i))[0] for i in range(20)}
    assert firsts == {"x", "y"}  # unknown devices share the first requests


def test_binary_request_and_response_round_trip() -> None:
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    body, headers = encode_request("X", batch, "probs")
    n = int(headers["Inference-Header-Content-Length"])
    assert np.frombuffer(body[n:], np.float32).reshape(3, 4).tolist() == batch.tolist()
    out = np.eye(3, dtype=np.float32)
    head = b'{"outputs":[{"name":"probs","datatype":"FP32","shape":[3,3],"parameters":{"binary_data_size":36}}]}'
    assert decode_response(head + out.tobytes(), str(len(head)), "probs").tolist() == out.tolist()
    as_json = b'{"outputs":[{"name":"probs","datatype":"FP32","shape":[1,2],"data":[0.5,0.5]}]}'
    assert decode_response(as_json, None, "probs").tolist() == [[0.5, 0.5]]
    assert split_endpoint("127.0.0.1:8500") == ("127.0.0.1", 8500)
    with pytest.raises(ValidationError):
        split_endpoint("nohost")


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_dataset_parsing() -> None:
    d = datasets.parse(_npz(x=np.zeros((5, 64), np.float32), y=np.arange(5)))
    assert d.x.shape == (5, 64) and d.y is not None
    rep = d.repeated(3)
    assert rep.x.shape == (15, 64) and rep.y is not None and rep.y[5:10].tolist() == list(range(5))
    for bad in (b"not a zip", _npz(z=np.zeros(3)), _npz(x=np.zeros((3, 2)), y=np.zeros(2, np.int64)),
                _npz(x=np.array(["a", "b"]))):  # fmt: skip
        with pytest.raises(ValidationError):
            datasets.parse(bad)
    with pytest.raises(ValidationError):
        d.repeated(0)
