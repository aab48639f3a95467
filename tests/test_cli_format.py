"""How the CLI shows things (pure): human times, progress never past 100 %, ids never cut."""

from __future__ import annotations

import time

from rich.console import Console

from evc.cli.format import human_time, percent, show, table


def test_human_times_relative_then_local_iso() -> None:
    now = 1_800_000_000.0
    assert human_time(now - 12, now) == "12s ago"
    assert human_time(now - 180, now) == "3m ago"
    assert human_time(now - 2 * 3600 - 300, now) == "2h05m ago"
    assert human_time(now + 600, now) == "in 10m"
    old = human_time(now - 3 * 86400, now)
    assert old.startswith(time.strftime("%Y-%m-%d %H:%M", time.localtime(now - 3 * 86400)))
    assert human_time(None) == "-"


def test_progress_is_clamped_to_100_percent() -> None:
    assert percent({"done": 3, "total": 1, "percent": 300.0}) == "1/1 (100%)"
    assert percent({"done": 1, "total": 4, "percent": 25.0}) == "1/4 (25%)"
    assert percent({}) == "0/1 (0%)"


def test_ids_and_names_are_never_cut_on_a_narrow_terminal() -> None:
    rows = [
        {"id": "dev_0123456789abcdef", "name": "t0001-sim-0001-a-long-name", "state": "unreachable",
         "host": "127.0.0.1", "port": 40123, "username": "evcuser", "privilege": "sudo", "level": 0,
         "created_at": time.time() - 5},
    ]  # fmt: skip
    console = Console(width=80, record=True)
    show(console, table(rows, ["id", "name", "state", "host", "port", "username", "privilege", "level", "created_at"]))
    text = console.export_text()
    assert "dev_0123456789abcdef" in text and "t0001-sim-0001-a-long-name" in text
    assert "…" not in text
    assert "s ago" in text


class _Devices:
    """What the health view reads from the API: the device listing."""

    def __init__(self, devices: list[dict]) -> None:
        self.devices = devices

    def get(self, path: str, **params: object) -> dict:
        assert path == "/api/v1/devices"
        return {"items": self.devices, "total": len(self.devices)}


def test_health_view_names_devices_and_says_why_each_is_not_online() -> None:
    from evc.cli.views import health_detail

    devices = [
        {"id": "dev_a", "name": "cam-hot", "state": "degraded", "health": {"breaches": ["temp 91°C > 85°C"]}},
        {"id": "dev_b", "name": "cam-ok", "state": "online", "health": {"breaches": []}},
        {"id": "dev_c", "name": "cam-gone", "state": "offline", "health": {}},
    ]
    job = {
        "results": {
            "dev_a": {"ok": True, "state": "degraded", "health": {"temp_c": 91}},
            "dev_b": {"ok": True, "state": "online", "health": {}},
            "dev_c": {"ok": False, "state": "offline", "error": {"reason": "unreachable", "message": "refused"}},
        },
        "summary": {"states": {"degraded": 1, "online": 1, "offline": 1}},
    }
    console = Console(width=100, record=True)
    health_detail(console, _Devices(devices), job)  # type: ignore[arg-type]
    lines = console.export_text().splitlines()
    assert any("cam-hot" in x and "degraded" in x and "temp 91°C > 85°C" in x for x in lines)
    assert any("cam-gone" in x and "offline" in x and "unreachable: refused" in x for x in lines)
    assert any("cam-ok" in x and "online" in x and x.rstrip().endswith("ok") for x in lines)
    assert "3 device(s) checked: 1 degraded, 1 offline, 1 online" in lines[-1]


class _Listing:
    def __init__(self, devices: list[dict], clusters: list[dict]) -> None:
        self.lists = {"/api/v1/devices": devices, "/api/v1/clusters": clusters}

    def get(self, path: str, **params: object) -> dict:
        items = [i for i in self.lists[path] if "name" not in params or i["name"].startswith(str(params["name"]))]
        return {"items": items, "total": len(items)}


def test_names_resolve_to_ids_and_ids_pass_through() -> None:
    import click
    import pytest

    from evc.cli.format import resolve

    client = _Listing(
        [{"id": "dev_1", "name": "cam"}, {"id": "dev_2", "name": "cam-2"}],
        [{"id": "cl_9", "name": "cluster_a"}],
    )
    assert resolve(client, "device", "cam") == "dev_1"  # type: ignore[arg-type]
    assert resolve(client, "device", "cam-2") == "dev_2"  # type: ignore[arg-type]
    assert resolve(client, "device", "dev_777") == "dev_777"  # type: ignore[arg-type]
    assert resolve(client, "cluster", "cluster_a") == "cl_9"  # type: ignore[arg-type]
    assert resolve(client, "cluster", "cl_5") == "cl_5"  # type: ignore[arg-type]
    with pytest.raises(click.BadParameter, match="no device is named 'ca'"):
        resolve(client, "device", "ca")  # type: ignore[arg-type]
