"""Helpers shared by the benchmarks: a private Redis, settings, the figure table."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evc.embedded import RedisServer
from evc.settings import Settings, load_settings


@dataclass
class Figure:
    name: str
    target: str
    measured: float
    unit: str
    ok: bool
    ratio: float | None = None

    def row(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        mark = "OK " if self.ok else "MISS"
        return f"{mark} {self.name:<48} target {self.target:<14} measured {self.measured:>10.2f} {self.unit:<8} ratio {ratio}"


def private_stack(tmp: Path | None = None) -> tuple[RedisServer, Settings]:
    tmp = tmp or Path(tempfile.mkdtemp(prefix="evc-bench-"))
    srv = RedisServer(tmp / "redis").start()
    settings = load_settings(env={}, redis_url=srv.url, data_dir=tmp / "data", key_prefix="bench")
    return srv, settings


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_figures(figures: list[Figure]) -> None:
    for f in figures:
        print(f.row())
