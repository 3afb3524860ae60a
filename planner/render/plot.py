"""Pictures for --plot: recommend's cost-versus-time frontier and estimate's memory per method, as SVG.

SVG is written by hand (a few shapes and labels), so pictures need no plotting library; PNG is the same SVG
converted by cairosvg where it is installed. Names in the pictures come from outside ftplan (model and
instance names) and are XML-escaped."""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from ftplan.errors import PlannerError
from ftplan.estimate.report import EstimateReport
from ftplan.recommend.models import Recommendation
from ftplan.render.console import clean
from ftplan.render.estimate import SEGMENTS, gib, memory_segments
from ftplan.render.explain import hours

WIDTH, HEIGHT, MARGIN = 840, 420, 70
LEGEND = 300  # px at the right for the legend
# rich's colour names of the terminal bars, as web colours: the picture and the terminal agree
COLOURS = {"blue": "#1f77b4", "cyan": "#17becf", "magenta": "#e377c2", "yellow": "#bcbd22", "green": "#2ca02c",
           "red": "#d62728"}


def _text(x: float, y: float, value: object, size: int = 12, anchor: str = "start", weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'font-family="sans-serif">{escape(clean(value))}</text>')


def _svg(height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def _scale(values: list[float], low: float, high: float):
    """Log scale onto [low, high]; all values equal (a tie) sit in the middle."""
    logs = [math.log(v) for v in values]
    span = max(logs) - min(logs)
    return lambda v: (low + high) / 2 if not span else low + (math.log(v) - min(logs)) / span * (high - low)


def _axis_labels(marks: list[tuple[float, str]], gap: float, draw) -> list[str]:
    """One label per distinct reading (ties share it), leaving out any that would overlap the last drawn."""
    out, last = [], None
    for at, label in sorted(set(marks)):
        if last is not None and (label == last[1] or abs(at - last[0]) < gap):
            continue
        out.append(draw(at, label))
        last = (at, label)
    return out


def frontier_svg(rec: Recommendation) -> str:
    """Cost against time on log axes, each frontier plan a labelled point, the recommended one in red and
    marked * in the legend."""
    # the recommended plan is drawn even off the frontier (a balanced priority may pick one): it is the answer
    points = [*rec.frontier, *([rec.recommended] if rec.recommended not in rec.frontier else [])]
    x = _scale([c.hours for c in points], MARGIN, WIDTH - LEGEND - 20)
    y = _scale([c.cost_usd for c in points], HEIGHT - MARGIN, MARGIN)
    body = [_text(MARGIN, 30, "Cost vs time frontier (log scales): nothing is both cheaper and faster", 14,
                  weight="bold"),
            f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN + 10}" x2="{WIDTH - LEGEND}" y2="{HEIGHT - MARGIN + 10}" '
            'stroke="black"/>',
            f'<line x1="{MARGIN - 10}" y1="{MARGIN}" x2="{MARGIN - 10}" y2="{HEIGHT - MARGIN + 10}" stroke="black"/>',
            _text((MARGIN + WIDTH - LEGEND) / 2, HEIGHT - 20, "training time (billed)", anchor="middle"),
            _text(20, MARGIN - 15, "cost ($)")]
    body += _axis_labels([(x(c.hours), hours(c.hours)) for c in points], 44,
                         lambda at, label: _text(at, HEIGHT - MARGIN + 28, label, 11, anchor="middle"))
    body += _axis_labels([(y(c.cost_usd), f"${c.cost_usd:,.2f}") for c in points], 14,
                         lambda at, label: _text(MARGIN - 14, at + 4, label, 10, anchor="end"))
    for i, c in enumerate(points):
        best = c == rec.recommended
        colour = "#d62728" if best else "#1f77b4"
        body.append(f'<circle cx="{x(c.hours):.1f}" cy="{y(c.cost_usd):.1f}" r="{7 if best else 5}" fill="{colour}"/>')
        body.append(_text(x(c.hours) + 9, y(c.cost_usd) - 6, chr(ord("a") + i % 26), 11))
        body.append(_text(WIDTH - LEGEND + 10, MARGIN + 16 * i, f"{chr(ord('a') + i % 26)} {c.method} {c.instance_count} x "
                          f"{c.instance_type}: {hours(c.hours)}, ${c.cost_usd:,.2f}" + (" *" if best else ""), 10))
    return _svg(HEIGHT, body)


def memory_svg(report: EstimateReport) -> str:
    """One horizontal stacked bar per method: the memory terms at its peak, on one scale."""
    scale = max(e.memory.peak_allocated_bytes for e in report.estimates) or 1
    bar_width, row = WIDTH - 2 * MARGIN - 100, 46
    height = 110 + row * len(report.estimates)
    body = [_text(MARGIN, 30, f"{report.model.name}: peak allocated memory per GPU, by term", 14, weight="bold")]
    for i, (name, colour) in enumerate(SEGMENTS):
        body.append(f'<rect x="{MARGIN + 105 * i}" y="44" width="12" height="12" fill="{COLOURS[colour]}"/>')
        body.append(_text(MARGIN + 105 * i + 16, 55, name, 11))
    for r, e in enumerate(report.estimates):
        top, left = 80 + row * r, MARGIN + 20
        body.append(_text(MARGIN + 10, top + 20, e.method, 12, anchor="end"))
        for _, value, colour in memory_segments(e):
            width = bar_width * value / scale
            body.append(f'<rect x="{left:.1f}" y="{top}" width="{width:.1f}" height="28" fill="{COLOURS[colour]}"/>')
            left += width
        body.append(_text(left + 8, top + 20, gib(e.memory.peak_allocated_bytes), 12))
    return _svg(height, body)


def write_plot(path: Path, svg: str) -> None:
    """Write `svg` to `path`: .svg as it is, .png through cairosvg; PlannerError for anything else."""
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise PlannerError(f"--plot {path}: write a .svg or a .png file")
    if suffix == ".png":
        try:
            import cairosvg
        except ImportError:
            raise PlannerError(f"--plot {path}: PNG needs cairosvg (pip install cairosvg); .svg needs nothing") from None
        data = cairosvg.svg2png(bytestring=svg.encode())
    else:
        data = svg.encode()
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise PlannerError(f"--plot {path}: cannot write it ({exc.strerror})") from None
