"""Runtime ``container``'s pure parts: the container's command line, which references a device
could pull, the default image (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evc.deployments import container, remote
from evc.settings import load_settings


def test_run_command_quotes_and_pins_the_image_id() -> None:
    spec = remote.Spec("dep_1", "m", "1", b"", "ab" * 32, "python3", 8600)
    image = container.Image("r:5000/evc-edge-infer:0.1.0@sha256:" + "cd" * 32, "ef" * 32, False, Path("/x"))
    cmd = container.run_command("podman", spec, image)
    assert cmd.startswith("podman rm -f evc-infer-dep_1 >/dev/null 2>&1; podman run --detach --name evc-infer-dep_1")
    assert '--volume "$HOME"/.evc/deploy/dep_1/models:/models:ro sha256:' + "ef" * 32 in cmd
    assert "--network host" in cmd and "--restart always" in cmd and cmd.endswith("--port 8600")
    assert container.pullable("127.0.0.1:5000/x:1") and container.pullable("registry.example.org/evc/x@sha256:1")
    assert not container.pullable("localhost/evc-edge-infer:0.1.0") and not container.pullable("evc:1")


def test_default_image_follows_the_setting() -> None:
    assert container.default_image(load_settings(env={})) == "localhost/evc-edge-infer:0.1.0"
    s = load_settings(env={"EVC_EDGE_IMAGE": "r:5000/e@sha256:" + "a" * 64, "EVC_EDGE_IMAGE_TLS_VERIFY": "0"})
    assert container.default_image(s) == "r:5000/e@sha256:" + "a" * 64 and s.edge_image_tls_verify is False


def test_the_exporter_gets_the_controllers_archive_only_of_an_image_devices_cannot_pull(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter playbook's variables: image_archive is filled in (from the controller's
    podman) in mode container, for a localhost/ image, when the operator gave none."""
    from evc import monitoring

    saved: list[tuple[str, Path]] = []

    def fake_archive(ref: str, folder: Path) -> Path | None:
        saved.append((ref, folder))
        return None if ref.endswith(":absent") else folder / "abc.tar"

    monkeypatch.setattr(container, "tagged_archive", fake_archive)
    s = load_settings(env={"EVC_DATA_DIR": str(tmp_path)})
    local = {"mode": "container", "image": "localhost/evc-edge-exporter:0.1.0", "image_archive": ""}
    got = monitoring.exporter_image_archive(s, local)
    assert got["image_archive"] == str(tmp_path / "images" / "exporter" / "abc.tar")
    assert saved == [("localhost/evc-edge-exporter:0.1.0", tmp_path / "images" / "exporter")]
    for unchanged in (
        {**local, "mode": "process"},
        {**local, "image": "127.0.0.1:5000/evc-edge-exporter:0.1.0@sha256:" + "a" * 64},
        {**local, "image_archive": "/srv/exporter.tar"},
        {**local, "image": "localhost/evc-edge-exporter:absent"},  # not on the controller: the device may hold it
    ):
        assert monitoring.exporter_image_archive(s, unchanged) == unchanged
    assert len(saved) == 2
