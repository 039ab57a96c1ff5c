"""Line charts of training metrics as inline SVG, drawn on the server.

The dashboard shows the loss and the DPO rewards with no JavaScript charting library. Each
chart is an `<svg>` element with a polyline per series, two axes with tick labels, the axis
names, and a legend when there is more than one series.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 480
HEIGHT = 280
# Room around the plot area for the tick labels, the axis names and the legend.
MARGIN_LEFT = 60
MARGIN_RIGHT = 16
MARGIN_TOP = 32
MARGIN_BOTTOM = 48
# Series longer than this are thinned to evenly spaced points, always keeping the last one.
MAX_POINTS = 500


@dataclass(frozen=True)
class Series:
    """One line of a chart: a name for the legend and its (step, value) points."""

    name: str
    points: Sequence[tuple[float, float]]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Return about `count` round tick values (steps of 1, 2 or 5 × 10^n) covering the range."""
    if high < low:
        low, high = high, low
    if high == low:
        spread = abs(low) * 0.1 or 1.0
        low, high = low - spread, high + spread
    raw_step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def format_number(value: float) -> str:
    """Format a tick value compactly: 12000 as 12k, 0.000005 as 5e-06, 0.25 as 0.25."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value / 1000:g}k"
    if magnitude < 0.001:
        return f"{value:.0e}"
    return f"{value:.4g}"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / (MAX_POINTS - 1)
    kept = [points[int(i * stride)] for i in range(MAX_POINTS - 1)]
    kept.append(points[-1])
    return kept


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [
        (float(x), float(y))
        for x, y in points
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    x_label: str = "step",
    chart_id: str = "chart",
) -> str:
    """Return an `<svg>` element that plots each series' (step, value) points as a polyline.

    Points whose step or value is missing, infinite or NaN are left out. With no points at
    all the chart shows its axes' frame and the words "No data yet".
    """
    lines = [(item.name, _thin(_finite(item.points))) for item in series]
    all_points = [point for _, points in lines for point in points]
    title_id = f"{chart_id}-title"
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{escape(title_id)}" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
    ]
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    if not all_points:
        parts.append(
            f'<rect class="chart-frame" x="{left}" y="{top}" width="{right - left}" '
            f'height="{bottom - top}"/>'
        )
        parts.append(
            f'<text class="chart-empty" x="{(left + right) / 2}" y="{(top + bottom) / 2}" '
            'text-anchor="middle">No data yet</text>'
        )
        parts.append(_axis_labels(left, right, top, bottom, x_label, y_label))
        parts.append("</svg>")
        return "".join(parts)

    x_ticks = nice_ticks(min(x for x, _ in all_points), max(x for x, _ in all_points))
    y_ticks = nice_ticks(min(y for _, y in all_points), max(y for _, y in all_points))
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def to_x(value: float) -> float:
        return left + (value - x_low) / (x_high - x_low) * (right - left)

    def to_y(value: float) -> float:
        return bottom - (value - y_low) / (y_high - y_low) * (bottom - top)

    for tick in y_ticks:
        y = to_y(tick)
        parts.append(
            f'<line class="chart-grid" x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="chart-tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(format_number(tick))}</text>"
        )
    for tick in x_ticks:
        x = to_x(tick)
        parts.append(
            f'<line class="chart-tick-mark" x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" '
            f'y2="{bottom + 5}"/>'
        )
        parts.append(
            f'<text class="chart-tick" x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">'
            f"{escape(format_number(tick))}</text>"
        )
    parts.append(f'<line class="chart-axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
    parts.append(f'<line class="chart-axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/>')
    parts.append(_axis_labels(left, right, top, bottom, x_label, y_label))

    for index, (name, points) in enumerate(lines):
        if not points:
            continue
        coordinates = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline class="chart-line chart-line-{index}" fill="none" '
            f'points="{coordinates}"><title>{escape(name)}</title></polyline>'
        )
        if len(points) == 1:
            x, y = points[0]
            parts.append(
                f'<circle class="chart-line-{index}" cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3"/>'
            )

    if len(lines) > 1:
        parts.append(_legend([name for name, _ in lines], left))
    parts.append("</svg>")
    return "".join(parts)


def _axis_labels(
    left: float, right: float, top: float, bottom: float, x_label: str, y_label: str
) -> str:
    middle_y = (top + bottom) / 2
    return (
        f'<text class="chart-label" x="{(left + right) / 2}" y="{HEIGHT - 8}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
        f'<text class="chart-label" x="14" y="{middle_y}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle_y})">{escape(y_label)}</text>'
    )


def _legend(names: list[str], left: float) -> str:
    parts = []
    x = left
    for index, name in enumerate(names):
        parts.append(
            f'<rect class="chart-swatch chart-line-{index}" x="{x}" y="10" width="14" height="4"/>'
            f'<text class="chart-legend" x="{x + 18}" y="16">{escape(name)}</text>'
        )
        # The swatch, then an estimated 10 px per character, enough at the phone font size.
        x += 18 + 10 * len(name) + 16
    return "".join(parts)
