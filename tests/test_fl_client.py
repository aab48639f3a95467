"""The device runtime as a real subprocess: ``python client.py --data shard.npz`` over pipes.

Drives whole rounds through the line-delimited JSON protocol and checks that the results equal
the in-process computation bit for bit, and that bad requests are answered, not fatal.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evc.errors import CommandFailed, ConnectionDropped, DeviceError
from evc.fl.data import Dataset, load_reference_digits, partition_dirichlet, write_shards
from evc.fl.local import ClientProcess
from evc.fl.models import load_model
from evc.fl.protocol import (
    CLIENT_PATH,
    decode_message,
    decode_params,
    encode_params,
    evaluate_request,
    fit_request,
    get_parameters_request,
    parse_evaluate_reply,
    parse_fit_reply,
    parse_get_parameters_reply,
    ping_request,
)
from evc.fl.simulation import simulate
from evc.fl.strategy import FitConfig, make_strategy

NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_reference_digits()


@pytest.fixture(scope="module")
def shard_paths(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> list[Path]:
    parts = partition_dirichlet(digits.y_train, 10, 0.5, 42)[:NUM_CLIENTS]
    return write_shards(tmp_path_factory.mktemp("shards"), digits.X_train, digits.y_train, parts)


@pytest.fixture(scope="module")
def clients(shard_paths: list[Path]) -> Iterator[list[ClientProcess]]:
    procs = [ClientProcess(p, device_id=f"dev-{k}") for k, p in enumerate(shard_paths)]
    yield procs
    for proc in procs:
        proc.close()


def _shards(digits: Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    parts = partition_dirichlet(digits.y_train, 10, 0.5, 42)[:NUM_CLIENTS]
    return [(digits.X_train[i], digits.y_train[i]) for i in parts]


def test_client_file_is_self_contained() -> None:
    """client.py is shipped alone: stdlib + numpy only, and parseable by Python 3.8."""
    tree = ast.parse(CLIENT_PATH.read_text(), feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "evc" not in imported
    assert imported - set(sys.stdlib_module_names) == {"numpy"}
    newer = [  # keywords that only exist on newer Pythons
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and any(k.arg == "strict" for k in node.keywords)
    ]
    assert newer == []


def test_ping_and_info(clients: list[ClientProcess], shard_paths: list[Path]) -> None:
    pong = clients[0].request({"op": "ping", "id": "p1"})
    assert pong["ok"] is True and pong["op"] == "pong" and pong["id"] == "p1"
    assert pong["pid"] == clients[0].proc.pid
    info = clients[0].request({"op": "info"})
    with np.load(shard_paths[0]) as z:
        y = z["y"]
    assert info["num_examples"] == len(y) == 129 and info["n_features"] == 64
    assert sum(info["label_counts"].values()) == 129


def test_rounds_through_processes_equal_in_process(clients: list[ClientProcess], digits: Dataset) -> None:
    """Three FedAvg rounds with pipelined requests give exactly the in-process result."""
    test = (digits.X_test, digits.y_test)
    pids = [c.proc.pid for c in clients]

    def remote_fit(
        cid: str, params: Sequence[np.ndarray], config: FitConfig
    ) -> tuple[Sequence[np.ndarray], int, Mapping[str, Any]]:
        proc = clients[int(cid)]
        reply = parse_fit_reply(proc.request(fit_request(params, config, request_id=cid)))
        assert reply.round == config["round"]
        return reply.params, reply.num_examples, reply.metrics

    model = load_model("softmax")
    shards = _shards(digits)
    for name, kw in [("fedavg", {}), ("fedprox", {"mu": 0.3})]:
        local = simulate(make_strategy(name, seed=42, **kw), model, shards, rounds=3, test=test)
        remote = simulate(make_strategy(name, seed=42, **kw), model, shards, rounds=3, test=test,
                          client_fit=remote_fit)  # fmt: skip
        for a, b in zip(local.params, remote.params, strict=True):
            np.testing.assert_array_equal(a, b)
        for lh, rh in zip(local.history, remote.history, strict=True):
            assert lh["eval_accuracy"] == rh["eval_accuracy"]
            assert lh["train_loss"] == rh["train_loss"]
            assert lh["num_examples"] == rh["num_examples"] == sum(len(y) for _, y in shards)
    assert [c.proc.pid for c in clients] == pids  # the same long-lived processes throughout
    assert all(c.proc.poll() is None for c in clients)


def test_pipelined_fit_and_evaluate(clients: list[ClientProcess], digits: Dataset) -> None:
    """Send to every client first, then collect: the replies match in-process fits exactly."""
    model = load_model("mlp:8")
    params = model.init_params(5)
    strategy = make_strategy("fedavg", seed=9, model="mlp:8", lr=0.05, local_epochs=2)
    plan = strategy.configure_fit(2, [str(k) for k in range(NUM_CLIENTS)])
    for cid, config in plan:
        clients[int(cid)].send(fit_request(params, config, request_id=f"fit-{cid}"))
    replies = [clients[int(cid)].receive() for cid, _ in plan]
    for (cid, _config), (X, y), raw in zip(plan, _shards(digits), replies, strict=True):
        assert raw["id"] == f"fit-{cid}" and raw["client_index"] == int(cid)
        reply = parse_fit_reply(raw)
        expected, metrics = model.fit(params, X, y, epochs=2, lr=0.05, batch_size=32,
                                      batch_order_seed=[9, 2, int(cid)])  # fmt: skip
        assert reply.num_examples == len(y) and reply.metrics["loss"] == metrics["loss"]
        assert reply.metrics["fit_seconds"] >= 0
        for a, b in zip(reply.params, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        ev = parse_evaluate_reply(clients[int(cid)].request(evaluate_request(expected, round=2, model="mlp:8")))
        assert ev.metrics == model.evaluate(expected, X, y) and ev.round == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"this is not json\n", "JSONDecodeError"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"op": "dance"}\n', "unknown op"),
        (b'{"op": "fit", "round": 1}\n', "needs 'params'"),
        (b'{"op": "fit", "round": 1, "params": "!!!notbase64"}\n', "Error"),
        (b'{"op": "evaluate", "params": "", "config": []}\n', "config must be"),
    ],
)
def test_bad_requests_are_answered_not_fatal(clients: list[ClientProcess], line: bytes, message: str) -> None:
    proc = clients[1]
    proc.send_raw(line)
    reply = proc.receive()
    assert reply["ok"] is False and message in reply["error"]
    assert proc.request(ping_request())["ok"] is True


def test_failing_fits_are_answered_not_fatal(clients: list[ClientProcess]) -> None:
    proc = clients[2]
    good = [np.zeros((64, 10)), np.zeros(10)]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "resnet"}, "unknown model"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": 1}, "client_index"),  # seeded without an index
    ]
    for config, message in cases:
        request = {"op": "fit", "round": 1, "params": encode_params(good), "config": config,
                   "id": 7}  # fmt: skip
        reply = proc.request(request)
        assert reply["ok"] is False and message in reply["error"], reply
        assert reply["id"] == 7 and reply["op"] == "fit" and reply["round"] == 1
        with pytest.raises(CommandFailed, match=re.escape(message)):
            parse_fit_reply(reply, device_id="dev-2")
    wrong_shape = {"op": "fit", "round": 1, "client_index": 0,
                   "params": encode_params([np.zeros((3, 10)), np.zeros(10)])}  # fmt: skip
    assert "shapes" in proc.request(wrong_shape)["error"]
    assert proc.proc.poll() is None
    ok = proc.request({"op": "fit", "round": 1, "client_index": 2, "params": encode_params(good),
                       "config": {"seed": 1}})  # fmt: skip
    assert ok["ok"] is True


def test_user_module_that_prints_keeps_stdout_clean(tmp_path: Path, shard_paths: list[Path]) -> None:
    module = tmp_path / "noisy_model.py"
    module.write_text(
        "import numpy as np\n"
        "def init_params(seed):\n    return [np.zeros(1)]\n"
        "def fit(params, X, y, *, epochs, lr, batch_size, batch_order_seed, prox_mu=0.0,"
        " global_params=None):\n"
        "    print('training!', batch_order_seed)\n"
        "    return [params[0] + len(y)], {'loss': 0.0, 'n': len(y)}\n"
        "def evaluate(params, X, y):\n"
        "    print('evaluating')\n"
        "    return {'loss': 0.0, 'accuracy': 1.0, 'n': len(y)}\n"
    )
    with ClientProcess(shard_paths[3], stderr=subprocess.PIPE) as proc:
        config = {"model": f"module:{module}", "seed": 3}
        reply = proc.request({"op": "fit", "round": 4, "client_index": 3, "config": config,
                              "params": encode_params([np.zeros(1)])})  # fmt: skip
        assert reply["ok"] is True
        np.testing.assert_array_equal(decode_params(reply["params"])[0], [145.0])
        ev = proc.request(evaluate_request([np.zeros(1)], model=f"module:{module}"))
        assert ev["ok"] is True and ev["metrics"]["accuracy"] == 1.0
        assert proc.close() == 0
        assert proc.proc.stderr is not None
        with proc.proc.stderr:
            assert b"training! [3, 4, 3]" in proc.proc.stderr.read()


def test_shutdown_and_end_of_input_exit_cleanly(shard_paths: list[Path]) -> None:
    proc = ClientProcess(shard_paths[0])
    reply = proc.request({"op": "shutdown", "id": 1})
    assert reply == {"ok": True, "op": "shutdown", "id": 1}
    assert proc.proc.wait(timeout=10) == 0
    with pytest.raises(ConnectionDropped):
        proc.request(ping_request())
    assert proc.close() == 0
    # EOF on stdin (the SSH channel closed) also ends the process with status 0
    out = subprocess.run(
        [sys.executable, str(CLIENT_PATH), "--data", str(shard_paths[0])],
        input=b'{"op":"ping"}\n', capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0
    assert json.loads(out.stdout)["op"] == "pong"


def test_missing_data_file_fails_at_start(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(CLIENT_PATH), "--data", str(tmp_path / "nope.npz")],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode != 0 and b"nope.npz" in out.stderr


def test_protocol_helpers_reject_bad_replies() -> None:
    with pytest.raises(DeviceError, match="malformed"):
        decode_message(b"garbage\n", device_id="d")
    with pytest.raises(DeviceError, match="not an object"):
        decode_message(b"[]")
    with pytest.raises(DeviceError, match="answered op"):
        parse_fit_reply({"ok": True, "op": "evaluate"})
    with pytest.raises(DeviceError, match="malformed fit reply"):
        parse_fit_reply({"ok": True, "op": "fit", "params": "???", "num_examples": 1})
    with pytest.raises(DeviceError, match="malformed evaluate reply"):
        parse_evaluate_reply({"ok": True, "op": "evaluate"})
    params = [np.arange(3.0), np.eye(2)]
    text = encode_params(params)
    base64.b64decode(text, validate=True)
    assert all(np.array_equal(a, b) for a, b in zip(params, decode_params(text), strict=True))


def test_get_parameters_gives_the_models_initial_weights(tmp_path: Path, shard_paths: list[Path]) -> None:
    """The op the server uses to learn a device-side model's shapes and weights (issue 10.3)."""
    module = tmp_path / "tiny_model.py"
    module.write_text(
        "import numpy as np\n"
        "def init_params(seed):\n    return [np.full((2, 3), float(seed)), np.zeros(3)]\n"
        "def fit(params, X, y, **kw):\n    return params, {'loss': 0.0, 'n': len(y)}\n"
        "def evaluate(params, X, y):\n    return {'loss': 0.0, 'accuracy': 1.0, 'n': len(y)}\n"
    )
    with ClientProcess(shard_paths[0]) as proc:
        reply = proc.request(get_parameters_request(f"module:{module}", seed=7, n_classes=10, request_id=1))
        params = parse_get_parameters_reply(reply)
        assert reply["shapes"] == [[2, 3], [3]] and reply["id"] == 1
        np.testing.assert_array_equal(params[0], np.full((2, 3), 7.0))
        soft = parse_get_parameters_reply(proc.request(get_parameters_request("softmax", seed=None, n_classes=10)))
        assert [p.shape for p in soft] == [(64, 10), (10,)]
        bad = proc.request(get_parameters_request("module:/nonexistent.py", seed=1, n_classes=10))
        assert bad["ok"] is False and "does not exist" in bad["error"]
