"""The console's pure core (evc.console): SVG sparklines and curves, and its formatting."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from evc import console

SVG = "{http://www.w3.org/2000/svg}"


def test_sparkline_draws_values_with_gaps_and_an_accessible_name() -> None:
    svg = console.sparkline([0.1, 0.5, None, 0.3, "x", 0.9], title="load <of> sim-0001")
    root = ET.fromstring(svg)  # well-formed, with its title escaped
    assert root.get("role") == "img" and root.get("aria-label") == "load <of> sim-0001"
    lines = root.findall(f"{SVG}polyline")
    assert [len(p.get("points", "").split()) for p in lines] == [2, 1, 1]  # split at the gaps
    ys = [float(pt.split(",")[1]) for p in lines for pt in p.get("points", "").split()]
    assert max(ys) > min(ys) and min(ys) >= 0 and max(ys) <= 24  # the largest value is drawn highest
    empty = ET.fromstring(console.sparkline([]))
    assert empty.find(f"{SVG}line") is not None and empty.get("aria-label") == "no samples yet"
    flat = ET.fromstring(console.sparkline([1, 1, 1]))
    assert len({pt.split(",")[1] for pt in flat.find(f"{SVG}polyline").get("points", "").split()}) == 1  # type: ignore[union-attr]


def test_fl_curves_have_a_point_per_round_and_a_legend() -> None:
    rounds = [{"round": i, "eval_accuracy": a, "train_loss": 2 - a, "eval_loss": 1.9 - a}
              for i, a in enumerate([0.2, 0.5, 0.7], start=1)]  # fmt: skip
    charts = console.fl_curves(rounds)
    acc = ET.fromstring(charts["accuracy"])
    assert len(acc.findall(f".//{SVG}circle")) == 3
    assert [t.text for t in acc.findall(f".//{SVG}circle/{SVG}title")][-1] == "eval accuracy 3: 0.7"
    loss = ET.fromstring(charts["loss"])
    assert {p.get("data-series") for p in loss.findall(f".//{SVG}polyline")} == {"train loss", "eval loss"}
    assert ET.fromstring(console.fl_curves([])["accuracy"]).get("aria-label")  # no rounds yet: axes only


def test_ago_and_health_values() -> None:
    assert console.ago(None) == "never" and console.ago(100, now=112) == "12 s ago"
    assert console.ago(0.5, now=3 * 3600) == "2 h ago" and console.ago(1, now=2 * 86400) == "1 d ago"
    assert console.until(3600 + 100, now=100) == "in 1 h" and console.until(5, now=6) == "expired"
    samples: list[dict[str, object]] = [
        {"ok": True, "load1": 2.0},
        {"ok": False, "load1": None},
        {"ok": True, "load1": 1.0},
    ]
    assert console.health_values(samples, 4) == [0.5, None, 0.25]


def test_a_health_change_adds_a_sample_to_the_history() -> None:
    from evc.store.sessions import health_sample

    assert health_sample("dev_1", {"state": "online"}) is None  # no health record in the change
    got = health_sample("dev_1", {"state": "degraded", "health": {"checked_at": 5.0, "load1": 3.0,
                                                                 "mem_used_ratio": 0.5, "error": None}})  # fmt: skip
    assert got == {"ts": 5.0, "load1": 3.0, "mem": 0.5, "ok": True, "state": "degraded"}
    failed = health_sample("dev_1", {"health": {"checked_at": 6.0, "error": {"reason": "timeout"}}})
    assert failed is not None and failed["ok"] is False
