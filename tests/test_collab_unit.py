"""Collaborative inference, the pure parts: confidence scores, the cascade's curve and tuned
threshold, the cut points of an ONNX graph with their head/tail models, the cut prediction."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from evc.errors import ValidationError
from evc.inference import cascade, cuts
from tests.fixtures.collab_models import cloud_model, digits

P = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33], [0.6, 0.4, 0.0]])


def test_scores_order_items_by_confidence() -> None:
    assert cascade.max_prob(P).tolist() == pytest.approx([0.9, 0.4, 0.34, 0.6])
    assert cascade.margin(P).tolist() == pytest.approx([0.85, 0.05, 0.01, 0.2])
    ent = cascade.entropy(P)
    assert ent[0] > ent[3] > ent[1] > ent[2] >= 0 and cascade.entropy(np.eye(3))[0] == pytest.approx(1.0)
    assert cascade.offloaded(cascade.confidence(P, "margin"), 0.1).tolist() == [False, True, True, False]
    with pytest.raises(ValidationError):
        cascade.confidence(P, "nope")


def test_curve_and_tuning_for_accuracy_and_offload() -> None:
    conf = np.array([0.9, 0.2, 0.5, 0.5, 0.8, 0.1])
    edge = np.array([1, 0, 1, 0, 1, 0], bool)
    cloud = np.array([1, 1, 1, 1, 0, 1], bool)
    cv = cascade.curve(conf, edge, cloud)
    # ties (0.5, 0.5) go together: offload 0, 1, 2, 4, 5, 6 items
    assert (cv.offload * 6).round().tolist() == [0, 1, 2, 4, 5, 6]
    assert (cv.accuracy * 6).round().tolist() == [3, 4, 5, 6, 5, 5]
    t = cascade.tune(cv, target_accuracy=1.0)
    assert t.reached and t.offload == pytest.approx(4 / 6) and t.threshold == 0.8
    assert cascade.offloaded(conf, t.threshold).sum() == 4
    t = cascade.tune(cv, target_offload=0.5)
    assert t.offload == pytest.approx(2 / 6) and t.accuracy == pytest.approx(5 / 6)
    t = cascade.tune(cv, target_accuracy=1.0, target_offload=0.5)
    assert not t.reached and t.offload <= 0.5
    with pytest.raises(ValidationError):
        cascade.tune(cv)


@pytest.fixture(scope="module")
def cnn() -> tuple[onnx.ModelProto, np.ndarray]:
    d = digits()
    return onnx.load_from_string(cloud_model(d, c1=4, c2=8, steps=20)), d.x_test[:5]


def test_candidates_are_the_single_tensor_cuts(cnn: tuple[onnx.ModelProto, np.ndarray]) -> None:
    model, _ = cnn
    cs = cuts.candidates(model)
    assert [c.tensor for c in cs] == ["X", "img", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flat",
                                      "logits", "probs"]  # fmt: skip
    assert [c.bytes_per_item for c in cs][:5] == [256, 256, 4 * 64 * 4, 4 * 64 * 4, 4 * 16 * 4]
    assert cs[0].head_nodes == 0 and cs[-1].tail_nodes == 0


def test_head_then_tail_equals_the_whole(cnn: tuple[onnx.ModelProto, np.ndarray]) -> None:
    model, x = cnn
    whole = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]
    for c in cuts.candidates(model):
        head, tail = cuts.split(model, c)
        mid = ort.InferenceSession(head.SerializeToString()).run(None, {"X": x})[0]
        if tail is None:
            out = mid
        else:
            t = ort.InferenceSession(tail.SerializeToString())
            out = t.run(None, {t.get_inputs()[0].name: mid})[0]
        np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)


def test_the_edge_server_threads_setting_reaches_its_command_line() -> None:
    from evc.deployments.remote import supervise_script

    assert "--port 8600 --threads 1 &" in supervise_script("~/py", 8600, threads=1)
    assert "--port 8600 &" in supervise_script("~/py", 8600)


def test_predict_and_choose_trade_compute_for_bytes() -> None:
    cs = [cuts.Cut(0, "X", 1000, 0, 2), cuts.Cut(1, "mid", 100, 1, 1), cuts.Cut(2, "out", 10, 2, 0)]
    slow = cuts.Link(bandwidth_bps=1e6, rtt_s=0.001)
    fast = cuts.Link(bandwidth_bps=1e9, rtt_s=0.001)
    device, cloud = [0.0, 0.004, 0.05], [0.002, 0.001, 0.0]
    best, why = cuts.choose(cuts.predict(cs, device, cloud, slow, batch=10))
    assert best.cut.index == 1 and why.startswith("c1 (mid)")
    best, _ = cuts.choose(cuts.predict(cs, device, cloud, fast, batch=10))
    assert best.cut.index == 0
    assert cuts.transfer_s(slow, 1000) == pytest.approx(0.001 + 8 * (1000 + cuts.HEADER_BYTES) / 1e6)
