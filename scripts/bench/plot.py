"""A small line chart drawn with Pillow (a fastembed dependency; matplotlib is not one)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1000, 620
LEFT, RIGHT, TOP, BOTTOM = 90, 250, 60, 70
COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (255, 187, 120),
)

Point = tuple[float, float]


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]
    dashed: bool = False


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round-numbered ticks covering [low, high]."""
    if high <= low:
        high = low + 1
    raw = (high - low) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step / 2:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def _segments(points: Sequence[Point], dashed: bool) -> list[tuple[Point, Point]]:
    pairs = list(itertools.pairwise(points))
    if not dashed:
        return pairs
    dashes = []
    for (x0, y0), (x1, y1) in pairs:
        length = math.hypot(x1 - x0, y1 - y0)
        pieces = max(1, int(length // 8))
        for index in range(0, pieces, 2):
            a, b = index / pieces, min(1.0, (index + 1) / pieces)
            dashes.append(
                ((x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b))
            )
    return dashes


@dataclass(frozen=True)
class _Frame:
    """Data coordinates → pixels, linear or logarithmic on either axis."""

    x_range: tuple[float, float]
    y_ticks: list[float]
    log_x: bool
    log_y: bool
    y_floor: float

    def fx(self, x: float) -> float:
        return math.log10(x) if self.log_x else x

    def fy(self, y: float) -> float:
        return math.log10(max(y, self.y_floor)) if self.log_y else y

    def at(self, x: float, y: float) -> Point:
        (x_low, x_high), ticks = self.x_range, self.y_ticks
        y_low, y_high = self.fy(ticks[0]), self.fy(ticks[-1])
        px = LEFT + (self.fx(x) - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)
        plot_h = HEIGHT - TOP - BOTTOM
        return px, TOP + plot_h - (self.fy(y) - y_low) / (y_high - y_low) * plot_h


def _frame(
    series: Sequence[Series], extra_ys: Sequence[float], log_x: bool, log_y: bool, y_floor: float
) -> _Frame:
    xs = [math.log10(x) if log_x else x for s in series for x, _ in s.points]
    ys = [y for y in [*(y for s in series for _, y in s.points), *extra_ys] if math.isfinite(y)]
    if log_y:
        low = math.floor(math.log10(max(min(ys), y_floor)))
        ticks = [10.0**power for power in range(low, math.ceil(math.log10(max(ys))) + 1)]
    else:
        ticks = _ticks(min(0.0, *ys), max(ys))
    x_low, x_high = min(xs), max(xs)
    return _Frame((x_low, x_high if x_high > x_low else x_low + 1), ticks, log_x, log_y, y_floor)


def _axes(
    draw: ImageDraw.ImageDraw, frame: _Frame, x_values: list[float], labels: tuple[str, str, str]
) -> None:
    font, small = _font(16), _font(13)
    title, x_label, y_label = labels
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    draw.text((LEFT, 18), title, fill="black", font=font)
    draw.rectangle((LEFT, TOP, right, bottom), outline="black")
    for tick in frame.y_ticks:
        _, py = frame.at(x_values[0], tick)
        draw.line((LEFT, py, right, py), fill=(225, 225, 225))
        draw.text((LEFT - 8, py), _label(tick), fill="black", font=small, anchor="rm")
    for x in x_values:
        px, _ = frame.at(x, frame.y_ticks[0])
        draw.line((px, TOP, px, bottom), fill=(235, 235, 235))
        draw.text((px, bottom + 8), _label(x), fill="black", font=small, anchor="mt")
    draw.text(((LEFT + right) / 2, HEIGHT - 24), x_label, fill="black", font=font, anchor="mm")
    draw.text((14, TOP - 24), y_label, fill="black", font=font)


def _reference(
    draw: ImageDraw.ImageDraw, frame: _Frame, x0: float, lines: Mapping[str, float]
) -> None:
    for index, (name, value) in enumerate(sorted(lines.items(), key=lambda item: item[1])):
        _, py = frame.at(x0, value)
        for start, end in _segments([(LEFT, py), (WIDTH - RIGHT, py)], dashed=True):
            draw.line((*start, *end), fill=(200, 0, 0), width=1)
        anchor_x = WIDTH - RIGHT - 4 if index % 2 == 0 else LEFT + 4
        draw.text(
            (anchor_x, py - 4),
            name,
            fill=(200, 0, 0),
            font=_font(13),
            anchor="rb" if index % 2 == 0 else "lb",
        )


def _lines(draw: ImageDraw.ImageDraw, frame: _Frame, series: Sequence[Series]) -> None:
    for index, item in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [frame.at(x, y) for x, y in item.points if math.isfinite(y)]
        for start, end in _segments(points, item.dashed):
            draw.line((*start, *end), fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        legend_x, legend_y = WIDTH - RIGHT + 16, TOP + 10 + index * 22
        for start, end in _segments([(legend_x, legend_y), (legend_x + 28, legend_y)], item.dashed):
            draw.line((*start, *end), fill=colour, width=2)
        draw.text((legend_x + 36, legend_y), item.name, fill="black", font=_font(13), anchor="lm")


def line_chart(
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[Series],
    *,
    log_x: bool = False,
    log_y: bool = False,
    y_floor: float = 0.1,
    hlines: Mapping[str, float] | None = None,
) -> None:
    """Draw `series` as lines with markers; `hlines` are labelled horizontal reference lines.

    On a logarithmic y axis, values below `y_floor` (zero, negative) are drawn at it.
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    frame = _frame(series, list((hlines or {}).values()), log_x, log_y, y_floor)
    x_values = sorted({x for s in series for x, _ in s.points})
    _axes(draw, frame, x_values, (title, x_label, y_label))
    _reference(draw, frame, x_values[0], hlines or {})
    _lines(draw, frame, series)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"plot written to {path}")
