"""A small SVG line chart (log-scaled x, optionally log-scaled y) for the benches' charts in the docs:
no plotting library to install for one picture."""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 70, 210, 40, 50
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def line_chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    *,
    log_y: bool = False,
    x_title: str = "share of rows passing the filter",
    x_label: str = "{:.1%}",
) -> str:
    """One line per series over x (by default a share from 0.001 to 1), log-scaled; ``x_label`` formats its
    ticks."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points if not log_y or y > 0]
    low_x, high_x = math.log10(min(xs)), math.log10(max(xs))
    if log_y:
        low_y, high_y = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    else:
        low_y, high_y = min(0.0, min(ys)) if min(ys) < 0.8 else 0.8, 1.0 if max(ys) <= 1 else max(ys)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - low_x) / max(high_x - low_x, 1e-9) * plot_w

    def py(y: float) -> float:
        value = math.log10(max(y, 10**low_y)) if log_y else y
        return TOP + plot_h - (value - low_y) / max(high_y - low_y, 1e-9) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="12">',
        f'<text x="{LEFT}" y="20" font-size="14">{escape(title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for x in sorted(set(xs)):
        label = x_label.format(x)
        parts.append(f'<text x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{label}</text>')
    ticks = (
        [10.0**e for e in range(int(low_y), int(high_y) + 1)]
        if log_y
        else [low_y + i * (high_y - low_y) / 4 for i in range(5)]
    )
    for y in ticks:
        label = f"{y:g}" if log_y else f"{y:.2f}"
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_title)}</text>')
    for number, (name, points) in enumerate(series.items()):
        colour = COLOURS[number % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(points))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        legend_y = TOP + 14 + number * 18
        parts.append(
            f'<line x1="{WIDTH - RIGHT + 12}" x2="{WIDTH - RIGHT + 32}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{WIDTH - RIGHT + 38}" y="{legend_y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
