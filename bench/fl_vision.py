"""Vision models on FEDERATED.md's digits task: the CNN after 20 FedAvg rounds (IID, 10 clients)
against the MLP trained centrally with the same SGD.

In process with :func:`evc.fl.simulation.simulate`, i.e. the devices' own code
(``evc/device/fl_client.py`` and ``fl_models.py``); ``tests/test_fl_vision.py`` shows the full
stack computes the very same weights. ``bench/fl_evc.py --model cnn`` runs it over SSH.

    .venv/bin/python bench/fl_vision.py [--rounds 20]

Target: the CNN's accuracy after 20 rounds IID >= the MLP's centralised accuracy (20 epochs,
lr 0.1, batch 32). Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Figure, emit  # noqa: E402

from evc.fl.data import load_reference_digits, partition_iid  # noqa: E402
from evc.fl.models import load_model  # noqa: E402
from evc.fl.simulation import simulate  # noqa: E402
from evc.fl.strategy import make_strategy  # noqa: E402


def centralised(spec: str, epochs: int, lr: float) -> float:
    """Test accuracy after *epochs* of plain SGD on the whole training split (batch 32, the
    batch order of epoch e from ``default_rng([42, e])``)."""
    ds = load_reference_digits()
    model = load_model(spec)
    params = model.init_params(42)
    for epoch in range(1, epochs + 1):
        params, _ = model.fit(params, ds.X_train, ds.y_train, epochs=1, lr=lr, batch_size=32,
                              batch_order_seed=[42, epoch])  # fmt: skip
    return float(model.evaluate(params, ds.X_test, ds.y_test)["accuracy"])


def federated(spec: str, rounds: int, lr: float, local_epochs: int) -> tuple[list[float], float]:
    """FedAvg on the IID split over 10 clients, all every round: accuracy per round, seconds."""
    ds = load_reference_digits()
    shards = [(ds.X_train[i], ds.y_train[i]) for i in partition_iid(len(ds.y_train), 10, 42)]
    strategy = make_strategy("fedavg", seed=42, model=spec, lr=lr, batch_size=32, local_epochs=local_epochs)
    started = time.perf_counter()
    result = simulate(strategy, load_model(spec), shards, rounds=rounds, test=(ds.X_test, ds.y_test))
    return [float(h["eval_accuracy"]) for h in result.history], time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    target = centralised("mlp", args.rounds, 0.1)
    print(f"\n{'model':<46} {'r1':>6} {'r5':>6} {'r10':>6} {'r20':>6}  {'time':>6}")
    rows = [("softmax", 0.1, 1), ("mlp", 0.1, 1), ("cnn", 0.1, 1), ("mlp", 0.3, 3), ("cnn", 0.3, 3), ("cnn:16", 0.3, 2)]
    cnn_best = 0.0
    for spec, lr, epochs in rows:
        acc, secs = federated(spec, args.rounds, lr, epochs)
        at = [acc[i - 1] for i in (1, 5, 10, args.rounds) if i <= len(acc)]
        label = f"FedAvg IID {spec}, lr {lr}, {epochs} local epoch(s)"
        print(f"{label:<46} " + " ".join(f"{a:6.4f}" for a in at) + f"  {secs:5.1f}s")
        if (spec, lr, epochs) == ("cnn", 0.3, 3):
            cnn_best = acc[-1]
    print()
    for spec, epochs, lr in (("softmax", args.rounds, 0.1), ("mlp", args.rounds, 0.1), ("mlp", args.rounds, 0.3),
                             ("mlp", 3 * args.rounds, 0.3), ("cnn", args.rounds, 0.1)):  # fmt: skip
        print(f"{f'centralised {spec}, {epochs} epochs, lr {lr}':<46} {centralised(spec, epochs, lr):6.4f}")
    ok = cnn_best >= target
    ratio = target / cnn_best if cnn_best else float("inf")
    name = f"FL CNN after {args.rounds} rounds IID (lr 0.3, 3 local epochs) vs centralised MLP"
    emit([Figure(name, f">= {target:.4f}", cnn_best, "acc", ok, ratio)])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
