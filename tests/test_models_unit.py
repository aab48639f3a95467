"""The model registry's pure parts: graph metadata and the FLOP estimate on hand-built ONNX
graphs, the blob store (content addressing, atomic private files, verification on read)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from evc.errors import ValidationError
from evc.models import metadata
from evc.models.blobs import BlobCorrupt, BlobStore, TooLarge


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def conv_gemm_matmul() -> onnx.ModelProto:
    """x (N,3,8,8) -Conv(4 filters 3x3, pad 1, bias)-> (N,4,8,8) -Flatten-> (N,256)
    -Gemm(W 256x10, bias)-> (N,10) -MatMul(10x5)-> (N,5)."""
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"]),
        helper.make_node("MatMul", ["g", "mw"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[_init("cw", (4, 3, 3, 3)), _init("cb", (4,)), _init("gw", (256, 10)), _init("gb", (10,)),
                     _init("mw", (10, 5))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")


def test_metadata_of_a_hand_built_graph() -> None:
    meta = metadata.extract(conv_gemm_matmul().SerializeToString())
    assert meta["inputs"] == [{"name": "x", "type": "float32", "shape": ["N", 3, 8, 8]}]
    assert meta["outputs"] == [{"name": "y", "type": "float32", "shape": ["N", 5]}]
    assert meta["opset"] == 17 and meta["opsets"] == {"ai.onnx": 17}
    assert meta["parameters"] == 4 * 3 * 3 * 3 + 4 + 256 * 10 + 10 + 10 * 5
    assert meta["nodes"] == 5
    assert meta["operations"] == {"Conv": 1, "Flatten": 1, "Gemm": 1, "MatMul": 1, "Relu": 1}
    conv = 4 * 8 * 8 * (2 * 3 * 3 * 3 + 1)  # per output: 27 multiply-adds and the bias
    gemm = 2 * 256 * 10 + 10
    matmul = 2 * 10 * 5
    assert meta["flops_by_op"] == {"Conv": conv, "Gemm": gemm, "MatMul": matmul}
    assert meta["flops"] == conv + gemm + matmul and meta["flops_unknown_nodes"] == 0
    assert meta["producer"] == "test"


def test_flops_of_gemm_transposed_and_batched_matmul() -> None:
    shapes = {"a": [7, 3], "b": [5, 7], "p": [2, 4, 6], "q": [6, 3]}
    gemm = helper.make_node("Gemm", ["a", "b"], ["o"], transA=1, transB=1)  # (3x7)(7x5)
    assert metadata.node_flops(gemm, shapes) == 2 * 3 * 7 * 5
    mm = helper.make_node("MatMul", ["p", "q"], ["o"])  # batch 2 of (4x6)(6x3)
    assert metadata.node_flops(mm, shapes) == 2 * 2 * 4 * 6 * 3
    assert metadata.node_flops(helper.make_node("MatMul", ["p", "unknown"], ["o"]), shapes) is None


def test_unknown_shapes_are_counted_not_guessed() -> None:
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[_init("w", (4, 2))],
    )  # fmt: skip
    meta = metadata.describe(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert meta["flops"] == 0 and meta["flops_unknown_nodes"] == 1
    assert meta["inputs"] == [{"name": "x", "type": "float32", "shape": None}]


def test_not_onnx_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="not an ONNX model"):
        metadata.extract(b"\xff\xfe definitely not a protobuf \x00\x01")


class _Refs:
    """What the blob store needs of the store: locks and references (in memory)."""

    def __init__(self) -> None:
        self.refs: dict[str, set[str]] = {}
        self.locks: dict[str, str] = {}

    def acquire_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        return self.locks.setdefault(name, owner) == owner

    def release_lock(self, name: str, owner: str) -> bool:
        return self.locks.pop(name, None) == owner

    def ref_blob(self, digest: str, ref: str) -> None:
        self.refs.setdefault(digest, set()).add(ref)

    def unref_blob(self, digest: str, ref: str) -> int:
        self.refs.get(digest, set()).discard(ref)
        return len(self.refs.get(digest, ()))


def test_blob_store_content_addressed_private_verified(tmp_path: Path) -> None:
    from evc.models.blobs import release

    bs, refs = BlobStore.of(tmp_path), _Refs()
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()
    blob = bs.stage(io.BytesIO(data)).commit(refs, "m:1")
    assert blob.digest == digest and blob.path == tmp_path / "models" / "blobs" / "sha256" / digest
    assert oct(blob.path.stat().st_mode & 0o777) == "0o600" and blob.size == len(data)
    assert not list(bs.tmp.iterdir())  # nothing left behind
    bs.stage(io.BytesIO(data)).commit(refs, "m:2")  # the same bytes: one blob, two references
    assert bs.read_verified(digest) == data and bs.verify(digest).size == len(data)
    assert not release(refs, bs, digest, "m:1") and bs.exists(digest)
    blob.path.write_bytes(data[:-1] + b"x")  # corrupted at rest
    with pytest.raises(BlobCorrupt, match="corrupt"):
        bs.verify(digest)
    assert release(refs, bs, digest, "m:2") and not bs.exists(digest)


def test_blob_store_limits_and_refuses_empty(tmp_path: Path) -> None:
    bs = BlobStore.of(tmp_path)
    with pytest.raises(TooLarge, match="limit of 1 MiB"):
        bs.stage(io.BytesIO(b"x" * (1024 * 1024 + 1)), limit=1024 * 1024)
    with pytest.raises(ValidationError, match="empty"):
        bs.stage(io.BytesIO(b""))
    assert not list(bs.tmp.iterdir())
    with pytest.raises(ValidationError):
        bs.path("../../etc/passwd")
