"""Federated learning out of the box (issue 11.2), as the README runs it, through the CLI over
real HTTP, a real worker and simulated devices whose ``python3`` has no numpy (the host's
/usr/bin/python3 here): the FL client refuses python3 saying why and what to do, L1 provides a
Python with numpy, `fl install`/`partition`/`start` use the cluster's setting and succeed, and
a job no device can train fails at once with each device's reason."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fixtures.cli import evc
from tests.fixtures.fleet import create_cluster, register_devices

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def numpy_wheels() -> Iterator[Path]:
    """A directory with the wheels L1's devenv installs (numpy, prometheus-client) for the
    devices' python3, from pip's configured indexes, so L1 needs no internet. World-readable: the simulated
    devices' accounts are other users."""
    directory = Path(tempfile.mkdtemp(prefix="evc-wheels-"))
    directory.chmod(0o755)
    try:
        yield _download_numpy(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _download_numpy(directory: Path) -> Path:
    python = "/usr/bin/python3"
    version = subprocess.run([python, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    if not version:
        pytest.skip("no /usr/bin/python3 for the simulated devices")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", version, "-d", str(directory), f"numpy=={np.__version__}",
         f"prometheus-client=={importlib.metadata.version('prometheus-client')}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"no wheels to give the devices: {res.stderr[-300:]}")
    for f in directory.iterdir():
        f.chmod(0o644)
    return directory


def test_fl_walkthrough_on_a_fleet_whose_python3_has_no_numpy(
    live: str,
    api: Any,
    worker: Any,
    sim_devices: Any,
    numpy_wheels: Path,
) -> None:
    sims = sim_devices(2, privilege="user")
    ids = register_devices(api, sims)
    no_numpy = subprocess.run(["/usr/bin/python3", "-c", "import numpy"], capture_output=True, check=False)
    cl = create_cluster(api, f"fl{time.time_ns()}", "direct", vars={
        "devenv": {"build_tools": False, "pip_find_links": str(numpy_wheels), "pip_no_index": True}})  # fmt: skip
    for dev in ids:
        assert api.call("POST", f"/api/v1/clusters/{cl['id']}/devices", json={"device_id": dev})[0] == 202
    if no_numpy.returncode != 0:  # L0: python3 cannot run the client, and the message says why
        code, _, both = evc(live, api.admin, "fl", "install", "--cluster", cl["id"])
        assert code == 1, both
        assert f"python3 on {sims[0].name} has no numpy; raise the cluster to L1" in both, both
    # L1 provisions a Python with numpy; fl install uses it (the cluster's setting)
    code, _, both = evc(live, api.admin, "cluster", "level", cl["id"], "1")
    assert code == 0, both
    code, stdout, both = evc(live, api.admin, "--json", "fl", "install", "--cluster", cl["id"])
    assert code == 0, both
    assert json.loads(stdout)["summary"]["python"] == "~/evc/venv/bin/python"
    assert (sims[0].home / "evc" / "venv" / "bin" / "python").exists()
    # as the README: partition, then start with the shard path and the test set
    code, _, both = evc(live, api.admin, "fl", "partition", "--cluster", cl["id"], "--partition", "dirichlet",
                        "--alpha", "0.5")  # fmt: skip
    assert code == 0 and "~/.evc/fl/data/digits/shard.npz" in both, both
    code, stdout, both = evc(live, api.admin, "--json", "fl", "start", "--cluster", cl["id"], "--data",
                             "~/.evc/fl/data/digits/shard.npz", "--test-set", "digits", "--rounds", "3")  # fmt: skip
    view = json.loads(stdout)
    assert code == 0 and view["state"] == "succeeded", both
    assert view["params"]["python"] == "~/evc/venv/bin/python"
    assert [r["num_clients"] for r in view["fl"]["rounds"]] == [2, 2, 2]
    assert view["fl"]["rounds"][-1]["eval_accuracy"] > 0.5
    # no device can train: the job fails at once, naming each device's reason; watch exits 1
    for dev in ids:
        api.store.update_device(dev, state="offline")
    started = time.monotonic()
    code, stdout, both = evc(live, api.admin, "--json", "fl", "start", "--cluster", cl["id"], "--data",
                             "~/.evc/fl/data/digits/shard.npz", "--rounds", "2")  # fmt: skip
    failed = json.loads(stdout)
    assert code == 1 and failed["state"] == "failed", both
    assert time.monotonic() - started < 30  # not after round_timeout (60 s)
    assert "no device can train" in failed["error"]["message"]
    assert all(failed["error"]["details"]["unavailable"][d] == "the device is offline" for d in ids)
    code, _, both = evc(live, api.admin, "fl", "watch", failed["id"])
    assert code == 1 and "failed" in both
