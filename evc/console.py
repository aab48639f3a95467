"""The web console's pure core: inline SVG charts (health sparklines, FL curves) and the
small formatting rules its pages share. No I/O: the pages in :mod:`evc.api.ui` call these."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

#: the colours of the curves of a chart, in order (high contrast on white)
PALETTE = ("#1f5fbf", "#c0392b", "#2e7d32", "#6a1b9a")


def _finite(values: Sequence[Any]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        out.append(float(v) if isinstance(v, int | float) and math.isfinite(v) else None)
    return out


def _scale(lo: float, hi: float, size: float, pad: float, invert: bool) -> Any:
    span = hi - lo or 1.0

    def f(v: float) -> float:
        r = (v - lo) / span
        return round(pad + (1 - r if invert else r) * (size - 2 * pad), 1)

    return f


def sparkline(values: Sequence[Any], *, width: int = 120, height: int = 24, title: str = "") -> str:
    """An inline SVG sparkline of *values* (None or non-numbers leave gaps); empty samples
    draw a flat grey line. *title* is its accessible name."""
    vals = _finite(values)
    nums = [v for v in vals if v is not None]
    label = escape(title or "no samples yet")
    head = (f'<svg class="spark" role="img" aria-label="{label}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{label}</title>')  # fmt: skip
    if not nums:
        return head + f'<line x1="0" y1="{height / 2}" x2="{width}" y2="{height / 2}" stroke="#aaa"/></svg>'
    lo, hi = min(nums), max(nums)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    x = _scale(0, max(len(vals) - 1, 1), width, 2, False)
    y = _scale(lo, hi, height, 2, True)
    paths = _segments([(x(i), y(v)) if v is not None else None for i, v in enumerate(vals)])
    body = "".join(f'<polyline fill="none" stroke="{PALETTE[0]}" stroke-width="1.5" points="{p}"/>' for p in paths)
    last = next((i for i in range(len(vals) - 1, -1, -1) if vals[i] is not None), None)
    if last is not None:
        body += f'<circle cx="{x(last)}" cy="{y(vals[last])}" r="2" fill="{PALETTE[0]}"/>'
    return head + body + "</svg>"


def _segments(points: Sequence[tuple[float, float] | None]) -> list[str]:
    """Polyline point lists, split where a point is missing."""
    out: list[str] = []
    cur: list[str] = []
    for p in points:
        if p is None:
            if cur:
                out.append(" ".join(cur))
            cur = []
        else:
            cur.append(f"{p[0]},{p[1]}")
    if cur:
        out.append(" ".join(cur))
    return out


def line_chart(
    xs: Sequence[Any],
    series: Mapping[str, Sequence[Any]],
    *,
    title: str,
    width: int = 480,
    height: int = 200,
    y_range: tuple[float, float] | None = None,
) -> str:
    """An inline SVG line chart: one curve per *series* over *xs* (e.g. rounds), with axes,
    the y range at the left, a legend, and a point per value (their values in titles)."""
    pad_l, pad_b, pad = 44, 24, 8
    nums = [v for vals in series.values() for v in _finite(vals) if v is not None]
    lo, hi = y_range or ((min(nums), max(nums)) if nums else (0.0, 1.0))
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    xf = _scale(0, max(len(xs) - 1, 1), width - pad_l, pad, False)
    yf = _scale(lo, hi, height - pad_b, pad, True)
    t = escape(title)
    parts = [
        f'<svg class="chart" role="img" aria-label="{t}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>',
        f'<g transform="translate({pad_l},0)">',
        f'<line x1="0" y1="{height - pad_b}" x2="{width - pad_l}" y2="{height - pad_b}" stroke="#555"/>',
        f'<line x1="0" y1="0" x2="0" y2="{height - pad_b}" stroke="#555"/>',
        f'<text x="-4" y="{yf(hi) + 4}" text-anchor="end" font-size="10">{_num(hi)}</text>',
        f'<text x="-4" y="{yf(lo)}" text-anchor="end" font-size="10">{_num(lo)}</text>',
    ]
    if xs:
        parts.append(f'<text x="{xf(0)}" y="{height - 8}" font-size="10">{escape(str(xs[0]))}</text>')
        parts.append(f'<text x="{xf(len(xs) - 1)}" y="{height - 8}" text-anchor="end" font-size="10">'
                     f"{escape(str(xs[-1]))}</text>")  # fmt: skip
    for n, (name, vals) in enumerate(series.items()):
        parts.extend(_curve(xs, _finite(vals), xf, yf, PALETTE[n % len(PALETTE)], name, n))
    parts.append("</g></svg>")
    return "".join(parts)


def _curve(xs: Sequence[Any], vals: list[float | None], xf: Any, yf: Any, colour: str, name: str, n: int) -> list[str]:
    pts = [(xf(i), yf(v)) if v is not None else None for i, v in enumerate(vals)]
    out = [f'<polyline class="curve" data-series="{escape(name)}" fill="none" stroke="{colour}" '
           f'stroke-width="2" points="{p}"/>' for p in _segments(pts)]  # fmt: skip
    for i, p in enumerate(pts):
        if p is not None:
            x = escape(str(xs[i])) if i < len(xs) else str(i)
            out.append(f'<circle cx="{p[0]}" cy="{p[1]}" r="3" fill="{colour}">'
                       f"<title>{escape(name)} {x}: {_num(vals[i])}</title></circle>")  # fmt: skip
    out.append(f'<text x="{xf(0) + 12 + 110 * n}" y="{12}" font-size="11" font-weight="600" fill="{colour}">'
               f"{escape(name)}</text>")  # fmt: skip
    return out


def _num(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def ago(ts: Any, now: float | None = None) -> str:
    """'12 s ago', '3 min ago', '2 h ago', '4 d ago'; 'never' without a time."""
    if not isinstance(ts, int | float) or ts <= 0:
        return "never"
    d = max(0.0, (time.time() if now is None else now) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if d >= size:
            return f"{int(d // size)} {unit} ago"
    return f"{int(d)} s ago"


def until(ts: Any, now: float | None = None) -> str:
    """'in 59 min' for a time ahead, 'expired' for one past; 'never' without a time."""
    if not isinstance(ts, int | float) or ts <= 0:
        return "never"
    t = time.time() if now is None else now
    if ts <= t:
        return "expired"
    return "in " + ago(t, now=ts).removesuffix(" ago")


def health_values(samples: Sequence[Mapping[str, Any]], per_cpu: float = 1.0) -> list[float | None]:
    """What a device's sparkline draws: the 1-minute load per CPU of each sample, None for a
    failed check (a gap)."""
    cpus = per_cpu if per_cpu > 0 else 1.0
    return [(float(s["load1"]) / cpus) if s.get("ok") and isinstance(s.get("load1"), int | float) else None
            for s in samples]  # fmt: skip


def fl_curves(rounds: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The FL page's two charts from its round records: accuracy and loss per round."""
    xs = [r.get("round") for r in rounds]
    acc = line_chart(xs, {"eval accuracy": [r.get("eval_accuracy") for r in rounds]},
                     title="Evaluation accuracy per round", y_range=(0.0, 1.0))  # fmt: skip
    loss = line_chart(
        xs,
        {"train loss": [r.get("train_loss") for r in rounds], "eval loss": [r.get("eval_loss") for r in rounds]},
        title="Training and evaluation loss per round",
    )
    return {"accuracy": acc, "loss": loss}
