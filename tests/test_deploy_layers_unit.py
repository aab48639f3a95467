"""The layered image shipment's pure parts: reading an OCI layout, what a device lacks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from evc.deployments import layers
from evc.errors import ConfigError


def _blob(root: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return digest


def _layout(root: Path, n: int = 2) -> tuple[list[str], list[str]]:
    blobs = [_blob(root, f"layer {i}".encode()) for i in range(n)]
    diff_ids = [f"sha256:{hashlib.sha256(f'tar {i}'.encode()).hexdigest()}" for i in range(n)]
    config = _blob(root, json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    manifest = _blob(root, json.dumps({"config": {"digest": f"sha256:{config}"},
                                       "layers": [{"digest": f"sha256:{b}"} for b in blobs]}).encode())  # fmt: skip
    (root / "index.json").write_text(json.dumps({"manifests": [{"digest": f"sha256:{manifest}"}]}))
    return blobs, diff_ids


def test_only_the_layers_a_device_lacks_are_sent(tmp_path: Path) -> None:
    blobs, diff_ids = _layout(tmp_path)
    lay = layers.read_layout(tmp_path)
    assert lay.layers == tuple(blobs) and lay.diff_ids == tuple(diff_ids)
    assert layers.missing(lay, []) == lay.blobs()
    assert layers.missing(lay, {diff_ids[0], "sha256:" + "0" * 64}) == [lay.manifest, lay.config, blobs[1]]
    assert layers.missing(lay, diff_ids) == [lay.manifest, lay.config]


def test_device_layers_parse_and_bad_layouts_refused(tmp_path: Path) -> None:
    assert layers.parse_layers('["sha256:a","sha256:b"]\nnull\n["sha256:a"]\nnoise\n') == {"sha256:a", "sha256:b"}
    _layout(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({"manifests": index["manifests"] * 2}))
    with pytest.raises(ConfigError, match="holds 2 images"):
        layers.read_layout(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"manifests": [{"digest": "md5:abc"}]}))
    with pytest.raises(ConfigError, match="only sha256"):
        layers.read_layout(tmp_path)
