"""Unit tests of the pure FL core: aggregation maths, strategies, partitions, checkpoints, models,
and the in-process reference run of shared/reference/FEDERATED.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evc.errors import Conflict, NotFound, PreconditionFailed, ValidationError
from evc.fl.aggregate import (
    WeightedAccumulator,
    fedadam_update,
    fedavgm_update,
    weighted_average,
    weighted_metrics,
)
from evc.fl.checkpoint import (
    checkpoint_path,
    latest_round,
    list_rounds,
    load_checkpoint,
    save_checkpoint,
)
from evc.fl.data import (
    Dataset,
    load_reference_digits,
    load_shard,
    partition_dirichlet,
    partition_iid,
    save_shard,
    write_shards,
)
from evc.fl.models import CNN, MLP, Model, SoftmaxRegression, is_device_model, load_model, validate_model_spec
from evc.fl.protocol import params_from_npz, params_to_npz
from evc.fl.simulation import simulate
from evc.fl.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FitResult,
    Strategy,
    make_strategy,
    sampling_rng,
)
from evc.store import new_id

# rounds 1, 5, 10, 20 of FEDERATED.md
REFERENCE = {
    "iid": [0.7917, 0.8556, 0.8611, 0.8806],
    "dirichlet": [0.8111, 0.8722, 0.8722, 0.8861],
}
DIRICHLET_SIZES = [129, 152, 132, 145, 160, 65, 172, 166, 118, 198]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_reference_digits()


def _shards(ds: Dataset, partition: str) -> list[tuple[np.ndarray, np.ndarray]]:
    if partition == "iid":
        parts = partition_iid(len(ds.y_train), 10, 42)
    else:
        parts = partition_dirichlet(ds.y_train, 10, 0.5, 42)
    return [(ds.X_train[i], ds.y_train[i]) for i in parts]


def _rand_params(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=(4, 3)), rng.normal(size=3)]


# ---- aggregation maths ------------------------------------------------------------------------


def test_weighted_average_by_hand() -> None:
    a = [np.array([1.0, 2.0]), np.array([[0.0]])]
    b = [np.array([3.0, 6.0]), np.array([[4.0]])]
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_allclose(out[0], [2.5, 5.0])
    np.testing.assert_allclose(out[1], [[3.0]])


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [1, float("nan")]])
def test_weighted_average_rejects_bad_weights(weights: list[float]) -> None:
    p = [np.zeros(2)]
    with pytest.raises(ValidationError):
        weighted_average([p, p], weights)


def test_weighted_average_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValidationError, match="shapes"):
        weighted_average([[np.zeros(2)], [np.zeros(3)]], [1, 1])


def test_streaming_equals_batch_in_any_order() -> None:
    rng = np.random.default_rng(0)
    updates = [_rand_params(rng) for _ in range(7)]
    weights = [int(w) for w in rng.integers(1, 200, size=7)]
    batch = weighted_average(updates, weights)
    for order in (range(7), reversed(range(7)), rng.permutation(7)):
        acc = WeightedAccumulator()
        for i in order:
            acc.add(updates[i], weights[i])
        for s, b in zip(acc.result(), batch, strict=True):
            np.testing.assert_allclose(s, b, rtol=0, atol=1e-13)
    assert acc.total_weight == sum(weights)


def test_accumulator_is_o_model_and_does_not_alias_inputs() -> None:
    p = [np.ones(3)]
    acc = WeightedAccumulator()
    acc.add(p, 2)
    acc.add([np.full(3, 4.0)], 2)
    assert p[0].tolist() == [1.0, 1.0, 1.0]
    assert len(acc.state().sums) == 1  # one running sum per array, however many clients
    np.testing.assert_allclose(acc.result()[0], 2.5)


def test_accumulator_keys_prevent_double_counting() -> None:
    acc = WeightedAccumulator()
    assert acc.add([np.array([0.0])], 1, key="a") is True
    assert acc.add([np.array([10.0])], 1, key="b") is True
    assert acc.add([np.array([1000.0])], 5, key="b") is False  # redelivery: ignored
    assert acc.count == 2 and acc.total_weight == 2 and acc.keys == {"a", "b"}
    np.testing.assert_allclose(acc.result()[0], 5.0)


def test_accumulator_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    ups = [_rand_params(rng) for _ in range(4)]
    full = WeightedAccumulator()
    half = WeightedAccumulator()
    for i, u in enumerate(ups):
        full.add(u, i + 1, key=str(i))
    for i, u in enumerate(ups[:2]):
        half.add(u, i + 1, key=str(i))
    resumed = WeightedAccumulator.from_state(half.state())
    assert resumed.add(ups[1], 2, key="1") is False
    for i, u in enumerate(ups[2:], start=2):
        resumed.add(u, i + 1, key=str(i))
    for a, b in zip(resumed.result(), full.result(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_accumulator_raises() -> None:
    with pytest.raises(ValidationError, match="nothing to aggregate"):
        WeightedAccumulator().result()


def test_weighted_metrics() -> None:
    out = weighted_metrics([(1, {"loss": 1.0, "tag": "x"}), (3, {"loss": 3.0, "acc": 0.5})])
    assert out == {"loss": 2.5, "acc": 0.5}


def test_fedavgm_without_momentum_is_fedavg() -> None:
    g = [np.array([1.0, 2.0])]
    avg = [np.array([0.0, 5.0])]
    new, mom = fedavgm_update(g, avg, None, server_lr=1.0, server_momentum=0.0)
    np.testing.assert_allclose(new[0], avg[0])
    assert mom is None


def test_fedavgm_momentum_accumulates() -> None:
    g = [np.array([1.0])]
    new, mom = fedavgm_update(g, [np.array([0.0])], None, server_lr=1.0, server_momentum=0.5)
    np.testing.assert_allclose(new[0], [0.0])  # first round: v = g
    new, mom = fedavgm_update(new, [np.array([-1.0])], mom, server_lr=1.0, server_momentum=0.5)
    assert mom is not None
    np.testing.assert_allclose(mom[0], [1.5])  # 0.5 * 1 + 1
    np.testing.assert_allclose(new[0], [-1.5])


def test_fedadam_first_step_is_eta_times_sign() -> None:
    g = [np.array([0.0, 0.0, 0.0])]
    avg = [np.array([0.3, -2.0, 1e-3])]
    new, state = fedadam_update(g, avg, None, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-12)
    np.testing.assert_allclose(new[0], [0.1, -0.1, 0.1], rtol=1e-6)
    assert state.t == 1


def _toy_rounds(strategy: Strategy, rounds: int) -> float:
    """Clients that each move 5-9% of the way to a target; returns the final L1 distance."""
    target = [np.array([3.0, -2.0]), np.array([1.0])]
    params = [np.zeros(2), np.zeros(1)]
    for r in range(1, rounds + 1):
        step = [t - p for p, t in zip(params, target, strict=True)]
        results = [
            (f"c{k}", [p + (0.05 + 0.02 * k) * d for p, d in zip(params, step, strict=True)],
             10 + k, {"loss": 1.0})
            for k in range(3)
        ]  # fmt: skip
        params, _ = strategy.aggregate_fit(r, params, results, [])
    return float(sum(np.abs(p - t).sum() for p, t in zip(params, target, strict=True)))


def test_server_optimisers_speed_up_a_slow_toy_problem() -> None:
    plain = _toy_rounds(FedAvg(), 20)
    assert plain == pytest.approx(_toy_rounds(FedAvgM(server_momentum=0.0), 20), abs=1e-12)
    assert 1.0 < plain < 2.0
    assert _toy_rounds(FedAvgM(server_momentum=0.5), 20) < plain / 5
    assert _toy_rounds(FedAdam(eta=0.3, beta_1=0.5), 20) < plain / 20


@pytest.mark.parametrize(
    ("name", "kw"),
    [("fedavgm", {"server_momentum": 0.9}), ("fedadam", {"eta": 0.05})],
)
def test_server_state_resume_is_exact(name: str, kw: dict[str, float]) -> None:
    rng = np.random.default_rng(3)
    rounds: list[list[FitResult]] = [[(f"c{k}", _rand_params(rng), 5 + k, {}) for k in range(3)] for _ in range(4)]
    start = [np.zeros((4, 3)), np.zeros(3)]
    straight = make_strategy(name, **kw)
    p = start
    for r, res in enumerate(rounds, start=1):
        p, _ = straight.aggregate_fit(r, p, res, [])
    q = start
    first = make_strategy(name, **kw)
    for r, res in enumerate(rounds[:2], start=1):
        q, _ = first.aggregate_fit(r, q, res, [])
    second = make_strategy(name, **kw)  # a fresh worker
    second.load_state(first.state())
    for r, res in enumerate(rounds[2:], start=3):
        q, _ = second.aggregate_fit(r, q, res, [])
    for a, b in zip(p, q, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- strategies ---------------------------------------------------------------------------------


IDS = [f"dev-{k}" for k in range(10)]


def test_sampling_is_seeded_and_order_independent() -> None:
    s = make_strategy("fedavg", fraction_fit=0.3, seed=7)
    a = s.configure_fit(1, IDS)
    b = s.configure_fit(1, list(reversed(IDS)), client_index={c: k for k, c in enumerate(IDS)})
    assert [c for c, _ in a] == [c for c, _ in b]
    assert len(a) == 3
    rounds = {tuple(c for c, _ in s.configure_fit(r, IDS)) for r in range(1, 11)}
    assert len(rounds) > 1  # each round draws anew
    other = make_strategy("fedavg", fraction_fit=0.3, seed=8)
    draws = [tuple(c for c, _ in other.configure_fit(r, IDS)) for r in range(1, 6)]
    assert draws != [tuple(c for c, _ in s.configure_fit(r, IDS)) for r in range(1, 6)]
    explicit = s.configure_fit(1, IDS, np.random.default_rng([7, 1]))
    assert [c for c, _ in explicit] == [c for c, _ in a]


def test_sampling_follows_the_job_order_never_the_ids() -> None:
    """Issue 16.1: the same seed and device order pick the same positions on any fleet, whatever
    ids its registration gave (ids that sort differently from the job order included)."""
    s = make_strategy("fedavg", fraction_fit=0.5, seed=42)
    fleets = [[f"dev_{h}" for h in "zyxwvutsrqponmlkjihg"], [f"dev_{k:02d}" for k in range(20)],
              [new_id("dev") for _ in range(20)]]  # fmt: skip
    for rnd in range(1, 6):
        picks = []
        for ids in fleets:
            index = {c: k for k, c in enumerate(ids)}
            picks.append([index[c] for c, _ in s.configure_fit(rnd, list(reversed(ids)), client_index=index)])
        assert picks[0] == picks[1] == picks[2], picks
        want = sorted(int(i) for i in sampling_rng(42, rnd).choice(20, size=10, replace=False))
        assert picks[0] == want  # the reference draw: positions in the job order


def test_fit_config_carries_training_plan_and_index() -> None:
    s = make_strategy("fedprox", mu=0.25, lr=0.05, batch_size=16, local_epochs=2, seed=3)
    plan = s.configure_fit(4, IDS, client_index={c: 100 + k for k, c in enumerate(IDS)})
    assert [c for c, _ in plan] == IDS
    cid, cfg = plan[2]
    assert cid == "dev-2"
    assert cfg == {
        "round": 4, "client_index": 102, "epochs": 2, "lr": 0.05, "batch_size": 16,
        "seed": 3, "prox_mu": 0.25, "model": "softmax",
    }  # fmt: skip


def test_min_fit_clients_raises_the_sample_size() -> None:
    s = make_strategy("fedavg", fraction_fit=0.1, min_fit_clients=4, min_available_clients=5)
    assert len(s.configure_fit(1, IDS)) == 4
    assert s.num_fit_clients(10) == 4
    assert make_strategy("fedavg", fraction_fit=0.7).num_fit_clients(10) == 7


def test_min_available_clients_gates_the_round() -> None:
    s = make_strategy("fedavg", min_fit_clients=3, min_available_clients=5)
    with pytest.raises(PreconditionFailed, match="at least 5 available"):
        s.configure_fit(1, IDS[:4])
    assert len(s.configure_fit(1, IDS[:5])) == 5


def test_min_fit_clients_gates_aggregation() -> None:
    s = make_strategy("fedavg", min_fit_clients=3, min_available_clients=3)
    g = [np.zeros(2)]
    s.begin_round(1, g)
    s.accumulate("a", [np.ones(2)], 5)
    s.accumulate("b", [np.ones(2)], 5)
    with pytest.raises(PreconditionFailed, match="min_fit_clients=3"):
        s.finish_round([("c", "timeout")])
    s.accumulate("c", [np.ones(2)], 5)  # the round stayed open
    new, metrics = s.finish_round([("d", "timeout")])
    np.testing.assert_allclose(new[0], 1.0)
    assert metrics["num_clients"] == 3 and metrics["failures"] == {"d": "timeout"}


def test_accept_failures_false() -> None:
    s = make_strategy("fedavg", accept_failures=False)
    with pytest.raises(PreconditionFailed, match="accept_failures"):
        s.aggregate_fit(1, [np.zeros(1)], [("a", [np.ones(1)], 1, {})], [("b", "crashed")])


def test_accumulate_is_idempotent_per_client_and_round() -> None:
    s = FedAvg()
    s.begin_round(1, [np.zeros(1)])
    assert s.accumulate("a", [np.array([1.0])], 10, {"loss": 1.0})
    assert not s.accumulate("a", [np.array([99.0])], 10, {"loss": 9.0})
    assert s.accumulate("b", [np.array([3.0])], 10, {"loss": 3.0})
    assert s.round_clients == {"a", "b"}
    new, metrics = s.finish_round()
    np.testing.assert_allclose(new[0], [2.0])
    assert metrics["num_examples"] == 20 and metrics["train_loss"] == 2.0
    with pytest.raises(Conflict):
        s.finish_round()  # closed: a second close cannot apply the update twice
    with pytest.raises(Conflict):
        s.accumulate("c", [np.zeros(1)], 1)
    # the batch path shares the rule
    new, metrics = FedAvg().aggregate_fit(
        1, [np.zeros(1)], [("a", [np.array([1.0])], 1, {}), ("a", [np.array([5.0])], 1, {})]
    )
    assert metrics["num_clients"] == 1
    np.testing.assert_allclose(new[0], [1.0])


def test_aggregate_fit_metrics() -> None:
    s = FedAvg()
    _, m = s.aggregate_fit(
        3,
        [np.zeros(1)],
        [("a", [np.ones(1)], 1, {"loss": 1.0, "n": 1}), ("b", [np.ones(1)], 3, {"loss": 2.0})],
        [("c", "timeout")],
    )
    assert m == {
        "round": 3, "num_clients": 2, "num_examples": 4, "num_failures": 1,
        "clients": ["a", "b"], "failures": {"c": "timeout"}, "train_loss": 1.75,
    }  # fmt: skip
    ev = s.aggregate_evaluate(3, [("a", 1, {"accuracy": 1.0}), ("b", 3, {"accuracy": 0.0})])
    assert ev == {"round": 3, "num_clients": 2, "num_examples": 4, "eval_accuracy": 0.25}


def test_accumulate_rejects_bad_updates() -> None:
    s = FedAvg()
    s.begin_round(1, [np.zeros(2), np.zeros(1)])
    with pytest.raises(ValidationError, match="sent 1 arrays"):
        s.accumulate("a", [np.zeros(2)], 1)
    with pytest.raises(ValidationError, match="shapes"):
        s.accumulate("a", [np.zeros(3), np.zeros(1)], 1)
    with pytest.raises(ValidationError):
        s.accumulate("a", [np.zeros(2), np.zeros(1)], 0)
    assert s.round_clients == frozenset()


def test_fedprox_mu_zero_equals_fedavg_exactly(digits: Dataset) -> None:
    shards = _shards(digits, "dirichlet")
    a = simulate(make_strategy("fedavg", seed=42), load_model("softmax"), shards, rounds=3)
    b = simulate(make_strategy("fedprox", mu=0.0, seed=42), load_model("softmax"), shards, rounds=3)
    for x, y in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(x, y)


def test_fedprox_pulls_clients_towards_the_global_model(digits: Dataset) -> None:
    X, y = _shards(digits, "iid")[0]
    model = SoftmaxRegression(64, 10)
    start = [np.full((64, 10), 0.01), np.zeros(10)]

    def drift(mu: float) -> float:
        new, _ = model.fit(start, X, y, epochs=3, lr=0.1, batch_size=32,
                           batch_order_seed=[1], prox_mu=mu)  # fmt: skip
        return float(sum(np.linalg.norm(n - s) for n, s in zip(new, start, strict=True)))

    assert drift(1.0) < drift(0.1) < drift(0.0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedsgd", {}, "unknown strategy"),
        ("fedavg", {"fraction": 0.5}, "unknown fedavg parameter"),
        ("fedavg", {"mu": 0.1}, "unknown fedavg parameter"),
        ("fedavg", {"fraction_fit": 0.0}, "fraction_fit"),
        ("fedavg", {"fraction_fit": 1.5}, "fraction_fit"),
        ("fedavg", {"fraction_fit": "all"}, "must be a number"),
        ("fedavg", {"min_fit_clients": 0}, "min_fit_clients"),
        ("fedavg", {"min_fit_clients": 2.5}, "integer"),
        ("fedavg", {"min_fit_clients": True}, "must be a number"),
        ("fedavg", {"min_fit_clients": 5, "min_available_clients": 2}, "min_available_clients"),
        ("fedavg", {"lr": -0.1}, "'lr'"),
        ("fedavg", {"lr": float("inf")}, "'lr'"),
        ("fedavg", {"seed": -1}, "seed"),
        ("fedavg", {"model": "resnet"}, "unknown model"),
        ("fedavg", {"accept_failures": "yes"}, "true or false"),
        ("fedprox", {"mu": -1}, "'mu'"),
        ("fedavgm", {"server_momentum": 1.0}, "server_momentum"),
        ("fedadam", {"tau": 0}, "'tau'"),
    ],
)
def test_make_strategy_validates(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_strategy(name, **params)


def test_make_strategy_builds_each_kind() -> None:
    assert isinstance(make_strategy("FedAvg"), FedAvg)
    prox = make_strategy("fedprox", mu=0.5, min_fit_clients=2, min_available_clients=3)
    assert isinstance(prox, FedProx) and prox.mu == 0.5
    assert prox.params()["mu"] == 0.5 and prox.params()["min_available_clients"] == 3
    m = make_strategy("fedavgm", server_lr=0.5, server_momentum=0.8, model="mlp:16")
    assert isinstance(m, FedAvgM) and m.server_lr == 0.5 and m.plan.model == "mlp:16"
    a = make_strategy("fedadam", eta=0.01, seed=None)
    assert isinstance(a, FedAdam) and a.plan.seed is None
    rebuilt = make_strategy("fedavgm", **{k: v for k, v in m.params().items()})
    assert rebuilt.params() == m.params()


# ---- data ---------------------------------------------------------------------------------------


def test_reference_split(digits: Dataset) -> None:
    assert digits.X_train.shape == (1437, 64) and digits.X_test.shape == (360, 64)
    assert digits.X_train.max() == 1.0 and digits.n_classes == 10


def test_shipped_digits_are_scikit_learns_split_without_importing_it(digits: Dataset) -> None:
    """Issue 11.2: the controller partitions digits with no scikit-learn installed; the shipped
    file holds exactly the rows scikit-learn's load_digits + train_test_split give."""
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] == 'sklearn': raise ImportError('no sklearn here')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from evc.fl.data import load_reference_digits\n"
        "ds = load_reference_digits(); print(ds.X_train.shape[0], ds.X_test.shape[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["1437", "360"]
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    raw = sklearn_datasets.load_digits()
    X_train, X_test, y_train, y_test = train_test_split(
        raw.data / 16.0, raw.target, test_size=0.2, stratify=raw.target, random_state=42
    )
    np.testing.assert_array_equal(digits.X_train, X_train)
    np.testing.assert_array_equal(digits.X_test, X_test)
    np.testing.assert_array_equal(digits.y_train, y_train)
    np.testing.assert_array_equal(digits.y_test, y_test)


def test_iid_partition() -> None:
    parts = partition_iid(1437, 10, 42)
    assert [len(p) for p in parts] == [144] * 7 + [143] * 3
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))
    np.testing.assert_array_equal(parts[0], np.random.default_rng(42).permutation(1437)[:144])


def test_dirichlet_partition_matches_reference_sizes(digits: Dataset) -> None:
    parts = partition_dirichlet(digits.y_train, 10, 0.5, 42)
    assert [len(p) for p in parts] == DIRICHLET_SIZES
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1437))
    again = partition_dirichlet(digits.y_train, 10, 0.5, 42)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # label skew: some client misses at least one class entirely
    assert min(len(np.unique(digits.y_train[p])) for p in parts) < 10


def test_dirichlet_redraws_until_every_client_has_min_size() -> None:
    y = np.repeat(np.arange(3), 40)
    parts = partition_dirichlet(y, 6, 0.1, 0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(ValidationError):
        partition_dirichlet(y, 13, 0.5, 0)


def test_partition_validation() -> None:
    with pytest.raises(ValidationError):
        partition_iid(5, 0, 1)
    with pytest.raises(ValidationError):
        partition_dirichlet(np.zeros(50, dtype=int), 2, 0.0, 1)


def test_shards_round_trip(tmp_path: Path, digits: Dataset) -> None:
    parts = partition_iid(len(digits.y_train), 3, 0)
    paths = write_shards(tmp_path / "s", digits.X_train, digits.y_train, parts)
    assert [p.name for p in paths] == ["shard-0.npz", "shard-1.npz", "shard-2.npz"]
    X, y = load_shard(paths[1])
    np.testing.assert_array_equal(X, digits.X_train[parts[1]])
    np.testing.assert_array_equal(y, digits.y_train[parts[1]])
    assert X.dtype == np.float64 and y.dtype == np.int64
    assert not list((tmp_path / "s").glob("*.tmp"))
    np.savez(tmp_path / "bad.npz", features=X)
    with pytest.raises(ValidationError, match="X and y"):
        load_shard(tmp_path / "bad.npz")
    with pytest.raises(ValidationError):
        save_shard(tmp_path / "x.npz", X, y[:-1])


# ---- checkpoints --------------------------------------------------------------------------------


def test_checkpoints(tmp_path: Path) -> None:
    assert list_rounds(tmp_path, "job-1") == [] and latest_round(tmp_path, "job-1") is None
    with pytest.raises(NotFound):
        load_checkpoint(tmp_path, "job-1")
    p0 = [np.zeros((2, 2)), np.arange(2.0)]
    save_checkpoint(tmp_path, "job-1", 0, p0)
    state = {"momentum_0": np.ones((2, 2)), "t": np.asarray(3)}
    path = save_checkpoint(tmp_path, "job-1", 12, [p + 1 for p in p0], state=state,
                           metadata={"accuracy": 0.5, "clients": ["a"]})  # fmt: skip
    save_checkpoint(tmp_path, "job-1", 2, p0)
    assert path == checkpoint_path(tmp_path, "job-1", 12) and path.name == "round-000012.npz"
    assert list_rounds(tmp_path, "job-1") == [0, 2, 12] and latest_round(tmp_path, "job-1") == 12
    ck = load_checkpoint(tmp_path, "job-1")
    assert ck.round == 12 and ck.metadata == {"accuracy": 0.5, "clients": ["a"]}
    np.testing.assert_array_equal(ck.params[1], [1.0, 2.0])
    assert set(ck.state) == {"momentum_0", "t"} and int(ck.state["t"]) == 3
    assert load_checkpoint(tmp_path, "job-1", 0).state == {}
    with pytest.raises(NotFound):
        load_checkpoint(tmp_path, "job-1", 5)
    assert not [f for f in (tmp_path / "job-1").iterdir() if not f.name.startswith("round-")]


def test_checkpoint_many_arrays_keep_order(tmp_path: Path) -> None:
    params = [np.full(1, float(i)) for i in range(12)]  # p_10 sorts before p_2 as text
    save_checkpoint(tmp_path, "j", 1, params)
    assert [float(p[0]) for p in load_checkpoint(tmp_path, "j", 1).params] == list(range(12))


def test_checkpoint_resume_of_fedavgm(tmp_path: Path) -> None:
    s = make_strategy("fedavgm", server_momentum=0.9)
    new, _ = s.aggregate_fit(1, [np.zeros(2)], [("a", [np.ones(2)], 1, {})])
    save_checkpoint(tmp_path, "j", 1, new, state=s.state())
    ck = load_checkpoint(tmp_path, "j")
    resumed = make_strategy("fedavgm", server_momentum=0.9)
    resumed.load_state(ck.state)
    a, _ = s.aggregate_fit(2, new, [("a", [np.full(2, 2.0)], 1, {})])
    b, _ = resumed.aggregate_fit(2, ck.params, [("a", [np.full(2, 2.0)], 1, {})])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("job", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_checkpoint_rejects_unsafe_job_ids(tmp_path: Path, job: str) -> None:
    with pytest.raises(ValidationError):
        save_checkpoint(tmp_path, job, 1, [np.zeros(1)])


def test_checkpoint_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="JSON"):
        save_checkpoint(tmp_path, "j", 1, [np.zeros(1)], metadata={"x": object()})
    assert list_rounds(tmp_path, "j") == []


def test_model_download_bytes_round_trip() -> None:
    params = [np.arange(6.0).reshape(2, 3), np.ones(3)]
    back = params_from_npz(params_to_npz(params))
    assert all(np.array_equal(a, b) for a, b in zip(params, back, strict=True))
    with pytest.raises(ValidationError):
        params_from_npz(b"not an npz")


# ---- models -------------------------------------------------------------------------------------


def test_load_model_specs(tmp_path: Path) -> None:
    soft = load_model("softmax", n_features=64, n_classes=10)
    assert isinstance(soft, SoftmaxRegression) and isinstance(soft, Model)
    assert [p.shape for p in soft.init_params(1)] == [(64, 10), (10,)]
    assert all(not p.any() for p in soft.init_params(5))
    mlp = load_model("mlp:16", n_features=8, n_classes=3)
    assert isinstance(mlp, MLP) and [p.shape for p in mlp.init_params(0)][0] == (8, 16)
    a, b = mlp.init_params(3), mlp.init_params(3)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], mlp.init_params(4)[0])
    for bad in ("resnet", "mlp:x", "module:/does/not/exist.py", ""):
        with pytest.raises(ValidationError):
            load_model(bad)
    assert validate_model_spec("module:/opt/m.py") == "module:/opt/m.py"
    with pytest.raises(ValidationError):
        validate_model_spec(3)


def test_user_module_model_on_the_device_side(tmp_path: Path) -> None:
    """The device runtime (client.py) loads a module model; the server's load_model never does."""
    from evc.device import fl_client as device

    src = tmp_path / "mean_model.py"
    src.write_text(
        "import numpy as np\n"
        "def init_params(seed):\n    return [np.zeros(2)]\n"
        "def fit(params, X, y, *, epochs, lr, batch_size, batch_order_seed, prox_mu=0.0,"
        " global_params=None):\n"
        "    return [params[0] + lr], {'loss': 0.5, 'n': len(y)}\n"
        "def evaluate(params, X, y):\n    return {'loss': 1.0, 'accuracy': 0.5, 'n': len(y)}\n"
    )
    model = device.load_model(f"module:{src}", n_features=1, n_classes=2)
    assert isinstance(model, Model)
    new, metrics = model.fit(model.init_params(0), np.zeros((3, 1)), np.zeros(3, dtype=int),
                             epochs=1, lr=0.25, batch_size=2, batch_order_seed=None)  # fmt: skip
    np.testing.assert_array_equal(new[0], [0.25, 0.25])
    assert metrics == {"loss": 0.5, "n": 3}
    incomplete = tmp_path / "bad.py"
    incomplete.write_text("def fit():\n    pass\n")
    with pytest.raises(ValueError, match="init_params, evaluate"):
        device.load_model(f"module:{incomplete}", n_features=1, n_classes=2)


def test_controller_never_imports_a_module_model(tmp_path: Path) -> None:
    """Issue 10.3: the server-side model loader refuses ``module:`` specs without importing."""
    marker = tmp_path / "ran"
    planted = tmp_path / "planted.py"
    planted.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert is_device_model(f"module:{planted}") and not is_device_model("mlp:4")
    with pytest.raises(ValidationError, match="code for the devices"):
        load_model(f"module:{planted}")
    assert validate_model_spec(f"module:{planted}") == f"module:{planted}"
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["softmax", "mlp"])
def test_models_learn_centralised(digits: Dataset, spec: str) -> None:
    model = load_model(spec)
    params = model.init_params(0)
    before = model.evaluate(params, digits.X_test, digits.y_test)
    for epoch in range(3):
        params, metrics = model.fit(params, digits.X_train, digits.y_train, epochs=1, lr=0.1,
                                    batch_size=32, batch_order_seed=[42, epoch])  # fmt: skip
    after = model.evaluate(params, digits.X_test, digits.y_test)
    assert metrics["n"] == 1437 and after["n"] == 360
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.8


def test_fit_keeps_last_partial_batch_and_input_params() -> None:
    model = SoftmaxRegression(2, 2)
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([0, 1, 1])
    start = model.init_params(0)
    full, _ = model.fit(start, X, y, epochs=1, lr=1.0, batch_size=2, batch_order_seed=None)
    head, _ = model.fit(start, X[:2], y[:2], epochs=1, lr=1.0, batch_size=2,
                        batch_order_seed=None)  # fmt: skip
    assert not np.array_equal(full[0], head[0])  # the third sample took a step of its own
    assert not start[0].any()
    with pytest.raises(ValueError, match="shapes"):
        model.fit([np.zeros((3, 2)), np.zeros(2)], X, y, epochs=1, lr=1.0, batch_size=2,
                  batch_order_seed=None)  # fmt: skip


# ---- the reference task -------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_reference_accuracy_in_process(digits: Dataset, partition: str) -> None:
    strategy = make_strategy("fedavg", seed=42, lr=0.1, batch_size=32, local_epochs=1)
    run = simulate(
        strategy, load_model("softmax"), _shards(digits, partition), rounds=20,
        test=(digits.X_test, digits.y_test),
    )  # fmt: skip
    got = [run.history[r - 1]["eval_accuracy"] for r in (1, 5, 10, 20)]
    assert got == pytest.approx(REFERENCE[partition], abs=0.005)
    assert all(h["num_clients"] == 10 and h["num_examples"] == 1437 for h in run.history)
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]


def test_built_in_models_are_reproducible_from_their_documentation() -> None:
    """Issue 16.3: the documented initialisation and layout, re-done with plain numpy."""
    d, h, k, seed = 64, 32, 10, 42
    rng = np.random.default_rng(seed)
    want = [
        rng.normal(0, np.sqrt(2 / d), (d, h)),
        np.zeros(h),
        rng.normal(0, np.sqrt(2 / (h + k)), (h, k)),
        np.zeros(k),
    ]
    got = load_model("mlp").init_params(seed)
    assert [p.shape for p in got] == [(d, h), (h,), (h, k), (k,)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(not p.any() for p in load_model("softmax").init_params(seed))
    assert [p.shape for p in load_model("softmax").init_params(0)] == [(d, k), (k,)]
    # a forward pass from the documented formula
    X = np.random.default_rng(1).random((5, d))
    logits = np.maximum(X @ got[0] + got[1], 0) @ got[2] + got[3]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(MLP(d, k).predict_proba(got, X), probs / probs.sum(1, keepdims=True), rtol=1e-12)


def test_cnn_layout_initialisation_and_gradients() -> None:
    """Issue 16.4: the CNN as documented (layout, seeded init), and its gradients are the
    loss's (central differences, at biases away from relu's kink)."""
    model = load_model("cnn")
    params = model.init_params(7)
    rng = np.random.default_rng(7)
    want = [rng.normal(0, np.sqrt(2 / 9), (8, 1, 3, 3)), np.zeros(8), rng.normal(0, np.sqrt(2 / 138), (128, 10)),
            np.zeros(10)]  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(params, want, strict=True))
    assert [p.shape for p in load_model("cnn:4").init_params(0)] == [(4, 1, 3, 3), (4,), (64, 10), (10,)]
    ds = load_reference_digits()
    X, y = ds.X_train[:6], ds.y_train[:6]
    params[1] = np.random.default_rng(1).normal(0, 0.1, 8)
    _, grads = CNN(64, 10).loss_grad([p.copy() for p in params], X, y)
    eps = 1e-6
    for k, p in enumerate(params):
        for idx in (tuple(0 for _ in p.shape), tuple(s - 1 for s in p.shape), tuple(s // 2 for s in p.shape)):
            up = [q.copy() for q in params]
            up[k][idx] += eps
            down = [q.copy() for q in params]
            down[k][idx] -= eps
            numeric = (CNN(64, 10).loss_grad(up, X, y)[0] - CNN(64, 10).loss_grad(down, X, y)[0]) / (2 * eps)
            assert numeric == pytest.approx(grads[k][idx], abs=1e-7), (k, idx)
    with pytest.raises(ValidationError, match="square images"):
        load_model("cnn", n_features=10)
    assert validate_model_spec("cnn:16") == "cnn:16" and validate_model_spec("plugin:my-trainer") == "plugin:my-trainer"
    assert is_device_model("plugin:my-trainer")
    with pytest.raises(ValidationError, match="never loads it"):
        load_model("plugin:my-trainer")
    for bad in ("cnn:0", "cnn:x", "plugin:", "plugin:../x"):
        with pytest.raises(ValidationError):
            validate_model_spec(bad)


@pytest.mark.parametrize("spec", ["softmax", "mlp", "mlp:16", "cnn", "cnn:4"])
def test_onnx_export_computes_what_the_model_computes(spec: str) -> None:
    """Issue 16.5: the ONNX graph built from the weights gives the numpy model's probabilities."""
    import onnxruntime as ort

    from evc.fl.export import onnx_accuracy, onnx_graph

    ds = load_reference_digits()
    model = load_model(spec)
    params, _ = model.fit(model.init_params(3), ds.X_train, ds.y_train, epochs=1, lr=0.1, batch_size=32,
                          batch_order_seed=[3])  # fmt: skip
    data = onnx_graph(spec, params, n_features=64, n_classes=10)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"X": ds.X_test.astype(np.float32)})[0]
    np.testing.assert_allclose(got, model.predict_proba(params, ds.X_test), atol=1e-5)  # type: ignore[attr-defined]
    assert onnx_accuracy(data, ds.X_test, ds.y_test) == model.evaluate(params, ds.X_test, ds.y_test)["accuracy"]
    with pytest.raises(ValidationError, match="no ONNX export"):
        onnx_graph("module:/x.py", params, n_features=64, n_classes=10)
