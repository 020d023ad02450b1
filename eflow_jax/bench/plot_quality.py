r"""Plots one metric of bench.quality's JSON lines against training examples, one line per tag (PNG).

    python -m eflow_jax.bench.plot_quality docs/bench_logs/2026-12-01_h200_quality_probe_s32.jsonl \
        --metric=probe_vel_err --out=docs/quality_probe_s32.png

Drawn with Pillow (a core dependency), so the docs' plots need nothing else installed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def curves(lines: list[str], metric: str) -> dict[str, list[tuple[float, float]]]:
    """{tag: [(examples, value), ...]} from bench.quality rows that carry `metric`."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in lines:
        row = json.loads(line)
        if row.get("bench") == "quality" and metric in row:
            out[row["tag"]].append((float(row["examples"]), float(row[metric])))
    return {tag: sorted(points) for tag, points in out.items()}


def plot(data: dict[str, list[tuple[float, float]]], metric: str, log_y: bool, size=(720, 420)) -> Image.Image:
    w, h = size
    left, right, top, bottom = 70, 170, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    fy = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    x0, x1 = 0.0, max(xs)
    y0, y1 = min(map(fy, ys)), max(map(fy, ys))
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (fy(y) - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # Axis ticks: examples below, the metric on the left.
        xv = x0 + i * (x1 - x0) / 4
        px, _ = to_px(xv, ys[0])
        draw.text((px - 15, h - bottom + 5), f"{xv / 1e3:.0f}k", fill="black")
        yv = y0 + i * (y1 - y0) / 4
        draw.text((5, h - bottom - i * (h - top - bottom) / 4 - 6),
                  f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}", fill="black")
    draw.text((left, 8), f"{metric} vs training examples{' (log scale)' if log_y else ''}", fill="black")
    for i, (tag, pts) in enumerate(sorted(data.items())):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([to_px(x, y) for x, y in pts], fill=colour, width=2)
        for x, y in pts:
            px, py = to_px(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((w - right + 10, top + 16 * i), tag, fill=colour)
    return img


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="bench.quality JSON-lines files.")
    p.add_argument("--metric", default="probe_vel_err")
    p.add_argument("--log_y", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    lines = [line for path in a.logs for line in open(path) if line.strip()]
    data = curves(lines, a.metric)
    if not data:
        raise SystemExit(f"no bench.quality rows with {a.metric!r} in {a.logs}")
    plot(data, a.metric, a.log_y).save(a.out)
    print(f"wrote {a.out}: {', '.join(sorted(data))}")


if __name__ == "__main__":
    main()
