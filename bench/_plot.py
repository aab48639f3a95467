"""A log-log line plot written as a PNG with the standard library alone (no matplotlib)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def loglog(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
           w: int = 640, h: int = 420) -> list[str]:  # fmt: skip
    """Each series a coloured line with square markers, both axes log10, grey grid lines at the
    powers of ten. Text is not drawn (no font): the legend (series -> colour) is returned and
    written next to the PNG as ``<path>.txt`` with the axis labels."""
    pts = [(x, y) for s in series.values() for x, y in s if x > 0 and y > 0]
    if not pts:
        return []
    lx = [math.log10(x) for x, _ in pts]
    ly = [math.log10(y) for _, y in pts]
    x0, x1 = math.floor(min(lx)), math.ceil(max(lx) + 1e-9)
    y0, y1 = math.floor(min(ly)), math.ceil(max(ly) + 1e-9)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    m = 40
    px = [[(255, 255, 255)] * w for _ in range(h)]

    def at(x: float, y: float) -> tuple[int, int]:
        cx = m + round((math.log10(x) - x0) / (x1 - x0) * (w - 2 * m))
        cy = h - m - round((math.log10(y) - y0) / (y1 - y0) * (h - 2 * m))
        return cx, cy

    def dot(c: int, r: int, col: tuple[int, int, int], size: int = 0) -> None:
        for dr in range(-size, size + 1):
            for dc in range(-size, size + 1):
                if 0 <= r + dr < h and 0 <= c + dc < w:
                    px[r + dr][c + dc] = col

    for e in range(x0, x1 + 1):  # grid at the powers of ten
        c = at(10**e, 10**y0)[0]
        for r in range(m, h - m + 1, 3):
            dot(c, r, (200, 200, 200))
    for e in range(y0, y1 + 1):
        r = at(10**x0, 10**e)[1]
        for c in range(m, w - m + 1, 3):
            dot(c, r, (200, 200, 200))
    legend = []
    for i, (name, s) in enumerate(series.items()):
        col = COLOURS[i % len(COLOURS)]
        good = sorted((x, y) for x, y in s if x > 0 and y > 0)
        for (xa, ya), (xb, yb) in zip(good, good[1:], strict=False):
            (c0, r0), (c1, r1) = at(xa, ya), at(xb, yb)
            steps = max(abs(c1 - c0), abs(r1 - r0), 1)
            for k in range(steps + 1):
                dot(round(c0 + (c1 - c0) * k / steps), round(r0 + (r1 - r0) * k / steps), col, 1)
        for x, y in good:
            dot(*at(x, y), col, 3)
        legend.append(f"{name}: rgb{col}")
    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))  # fmt: skip
    text = [f"x: {xlabel}, 10^{x0}..10^{x1} (log10)", f"y: {ylabel}, 10^{y0}..10^{y1} (log10)", *legend]
    path.with_suffix(".txt").write_text("\n".join(text) + "\n")
    return legend
