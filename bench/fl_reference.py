"""Reference FL benchmark: FEDERATED.md's digits task through 10 long-lived client processes.

Each simulated device is one ``python client.py --data shard-k.npz`` process, started once and
driven through the real line-delimited JSON protocol over pipes (the over-SSH end-to-end run is
the orchestrator's benchmark).  Per round the server pipelines the ten ``fit`` requests, folds
replies in as they are read (streaming FedAvg), and evaluates the global model on the 360 test
images.  Prints accuracy beside the reference and the median round time beside Flower's.

    .venv/bin/python bench/fl_reference.py [--rounds 20] [--partition iid|dirichlet|both]

Exit status 1 when an accuracy at rounds 1, 5, 10 or 20 is more than 0.005 off the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Figure, emit

from evc.fl.data import (
    Dataset,
    load_reference_digits,
    partition_dirichlet,
    partition_iid,
    write_shards,
)
from evc.fl.local import ClientProcess
from evc.fl.models import load_model
from evc.fl.protocol import fit_request, parse_fit_reply, ping_request
from evc.fl.simulation import simulate
from evc.fl.strategy import make_strategy

REFERENCE = {
    "iid": {1: 0.7917, 5: 0.8556, 10: 0.8611, 20: 0.8806},
    "dirichlet": {1: 0.8111, 5: 0.8722, 10: 0.8722, 20: 0.8861},
}
REFERENCE_ROUND_S = {
    "Flower deployment (SuperLink + 10 SuperNodes)": 17.1,
    "Flower simulation (ray)": 0.10,
    "numpy work itself (reference)": 0.002,
}
TOLERANCE = 0.005


def _parts(ds: Dataset, partition: str) -> list[np.ndarray]:
    if partition == "iid":
        return partition_iid(len(ds.y_train), 10, 42)
    return partition_dirichlet(ds.y_train, 10, 0.5, 42)


def run_partition(ds: Dataset, partition: str, rounds: int, workdir: Path, python: str) -> dict[str, Any]:
    shards = write_shards(workdir / partition, ds.X_train, ds.y_train, _parts(ds, partition))
    ids = [f"dev-{k}" for k in range(len(shards))]
    index = {c: k for k, c in enumerate(ids)}
    model = load_model("softmax")
    strategy = make_strategy("fedavg", seed=42, lr=0.1, batch_size=32, local_epochs=1)

    started = time.perf_counter()
    procs = {c: ClientProcess(p, python=python, device_id=c) for c, p in zip(ids, shards, strict=True)}
    try:
        for proc in procs.values():
            proc.send(ping_request())
        for proc in procs.values():
            assert proc.receive()["ok"]
        startup_s = time.perf_counter() - started
        pids = {c: p.proc.pid for c, p in procs.items()}

        params = model.init_params(42)
        history: list[dict[str, Any]] = []
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            plan = strategy.configure_fit(rnd, ids, client_index=index)
            for cid, config in plan:  # fan out: every device trains at once
                procs[cid].send(fit_request(params, config, request_id=f"{rnd}:{cid}"))
            strategy.begin_round(rnd, params)
            for cid, _ in plan:  # fold in each reply as it is read
                reply = parse_fit_reply(procs[cid].receive(), device_id=cid)
                strategy.accumulate(cid, reply.params, reply.num_examples, reply.metrics)
            params, metrics = strategy.finish_round()
            scores = model.evaluate(params, ds.X_test, ds.y_test)
            metrics.update(eval_accuracy=scores["accuracy"], eval_loss=scores["loss"])
            metrics["duration_s"] = time.perf_counter() - t0
            history.append(metrics)
        assert {c: p.proc.pid for c, p in procs.items()} == pids  # one process per job
    finally:
        for proc in procs.values():
            proc.close()

    inproc = simulate(
        make_strategy("fedavg", seed=42), model,
        [(ds.X_train[i], ds.y_train[i]) for i in _parts(ds, partition)],
        rounds=rounds, test=(ds.X_test, ds.y_test),
    )  # fmt: skip
    return {
        "partition": partition,
        "startup_s": startup_s,
        "accuracy": [h["eval_accuracy"] for h in history],
        "train_loss": [h["train_loss"] for h in history],
        "round_s": [h["duration_s"] for h in history],
        "median_round_s": statistics.median(h["duration_s"] for h in history[1:] or history),
        "inprocess_median_round_s": statistics.median(h["duration_s"] for h in inproc.history[1:] or inproc.history),
        "identical_to_inprocess": all(np.array_equal(a, b) for a, b in zip(params, inproc.params, strict=True)),
    }


def report(result: dict[str, Any]) -> bool:
    partition = result["partition"]
    ref = REFERENCE[partition]
    print(f"\n== {partition}: 10 client processes, FedAvg, softmax regression ==")
    print(f"client start-up (10 processes, once per job): {result['startup_s']:.2f} s")
    print(f"{'round':>5}  {'accuracy':>8}  {'reference':>9}  {'diff':>7}  {'round time':>10}")
    ok = True
    for rnd, (acc, secs) in enumerate(zip(result["accuracy"], result["round_s"], strict=True), 1):
        if rnd in ref:
            diff = acc - ref[rnd]
            ok &= abs(diff) <= TOLERANCE
            flag = "" if abs(diff) <= TOLERANCE else "  <-- off"
            print(f"{rnd:>5}  {acc:8.4f}  {ref[rnd]:9.4f}  {diff:+7.4f}  {secs * 1e3:8.1f}ms{flag}")
        else:
            print(f"{rnd:>5}  {acc:8.4f}  {'':>9}  {'':>7}  {secs * 1e3:8.1f}ms")
    print(f"final parameters identical to the in-process run: {result['identical_to_inprocess']}")
    print("median round time, rounds 2-20:")
    print(f"  {'EVC, 10 long-lived client processes over pipes':<50} "
          f"{result['median_round_s'] * 1e3:9.1f} ms")  # fmt: skip
    print(f"  {'EVC, in-process (no IPC)':<50} {result['inprocess_median_round_s'] * 1e3:9.1f} ms")
    for name, secs in REFERENCE_ROUND_S.items():
        print(f"  {name:<50} {secs * 1e3:9.1f} ms")
    return ok


def figures(result: dict[str, Any]) -> list[Figure]:
    """The run's figures: the accuracy (largest distance from the reference over the reference's
    rounds this run reached, as the EVC job's figure) and, for information, the round times."""
    partition, accuracy = result["partition"], result["accuracy"]
    ref = REFERENCE[partition]
    compared = [n for n in sorted(ref) if n <= len(accuracy)]
    worst = max((abs(accuracy[n - 1] - ref[n]) for n in compared), default=float("nan"))
    at = ", ".join(map(str, compared)) or "none"
    pipes, inproc = result["median_round_s"], result["inprocess_median_round_s"]
    return [
        Figure(f"FL reference {partition}: accuracy vs reference, max |diff| at rounds {at}", f"<= {TOLERANCE}",
               worst, "abs", worst <= TOLERANCE, worst / TOLERANCE),
        Figure(f"FL reference {partition}: median round, 10 processes over pipes", "-", pipes, "s", True),
        Figure(f"FL reference {partition}: median round, in-process", "-", inproc, "s", True),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partition", choices=["iid", "dirichlet", "both"], default="both")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the clients")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    ds = load_reference_digits()
    partitions = ["iid", "dirichlet"] if args.partition == "both" else [args.partition]
    results = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="evc-fl-bench-") as tmp:
        for partition in partitions:
            result = run_partition(ds, partition, args.rounds, Path(tmp), args.python)
            ok &= report(result)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\nRESULT:", "accuracy matches the reference" if ok else "ACCURACY MISMATCH")
    print()
    emit([f for result in results for f in figures(result)])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
