"""Plots written as PNGs with the standard library alone (no matplotlib): a pixel canvas, and a
log-log line plot on it."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
RGB = tuple[int, int, int]


class Canvas:
    """*w* × *h* RGB pixels, white; squares, lines, and a PNG of it."""

    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px: list[list[RGB]] = [[(255, 255, 255)] * w for _ in range(h)]

    def dot(self, c: int, r: int, col: RGB, size: int = 0) -> None:
        """A square of side 2 * *size* + 1 centred on column *c*, row *r*."""
        for dr in range(-size, size + 1):
            for dc in range(-size, size + 1):
                if 0 <= r + dr < self.h and 0 <= c + dc < self.w:
                    self.px[r + dr][c + dc] = col

    def line(self, a: tuple[int, int], b: tuple[int, int], col: RGB, size: int = 1) -> None:
        (c0, r0), (c1, r1) = a, b
        steps = max(abs(c1 - c0), abs(r1 - r0), 1)
        for k in range(steps + 1):
            self.dot(round(c0 + (c1 - c0) * k / steps), round(r0 + (r1 - r0) * k / steps), col, size)

    def save(self, path: Path) -> None:
        raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in self.px)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))  # fmt: skip


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
    cv = Canvas(w, h)

    def at(x: float, y: float) -> tuple[int, int]:
        cx = m + round((math.log10(x) - x0) / (x1 - x0) * (w - 2 * m))
        cy = h - m - round((math.log10(y) - y0) / (y1 - y0) * (h - 2 * m))
        return cx, cy

    for e in range(x0, x1 + 1):  # grid at the powers of ten
        c = at(10**e, 10**y0)[0]
        for r in range(m, h - m + 1, 3):
            cv.dot(c, r, (200, 200, 200))
    for e in range(y0, y1 + 1):
        r = at(10**x0, 10**e)[1]
        for c in range(m, w - m + 1, 3):
            cv.dot(c, r, (200, 200, 200))
    legend = []
    for i, (name, s) in enumerate(series.items()):
        col = COLOURS[i % len(COLOURS)]
        good = sorted((x, y) for x, y in s if x > 0 and y > 0)
        for (xa, ya), (xb, yb) in zip(good, good[1:], strict=False):
            cv.line(at(xa, ya), at(xb, yb), col)
        for x, y in good:
            cv.dot(*at(x, y), col, 3)
        legend.append(f"{name}: rgb{col}")
    cv.save(path)
    text = [f"x: {xlabel}, 10^{x0}..10^{x1} (log10)", f"y: {ylabel}, 10^{y0}..10^{y1} (log10)", *legend]
    path.with_suffix(".txt").write_text("\n".join(text) + "\n")
    return legend
