"""Dependency-free SVG charts for the reports (a file any browser opens; no matplotlib needed)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union
from xml.sax.saxutils import escape

from .errors import ConfigError

ROW_HEIGHT = 18
LABEL_WIDTH = 260
BAR_WIDTH = 420
VALUE_WIDTH = 90
TOP = 48


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    color: str = "#4C78A8"
    note: str = ""          # shown after the value, e.g. "float" or "bounds 0.5-0.9"
    tooltip: str = ""       # the bar's <title>: shown on hover
    css_class: str = ""     # extra class on the bar's rect (for tests and styling), besides "bar"


@dataclass(frozen=True)
class Marker:
    """A vertical line across all bars (e.g. the group's target), labelled in the legend."""

    value: float
    label: str
    color: str = "#E45756"


def bar_chart_svg(title: str, bars: Sequence[Bar], *, x_max: Optional[float] = None,
                  markers: Sequence[Marker] = (), value_format: str = "{:.1%}", subtitle: str = "",
                  empty_text: str = "") -> str:
    """A horizontal bar chart, one row per bar, as SVG text; negative values extend left of a zero line."""
    values = [b.value for b in bars] + [m.value for m in markers]
    low = min(values + [0.0])
    top = max(values + [1e-12])
    x_max = top if x_max is None else max(x_max, top)
    width = max(LABEL_WIDTH + BAR_WIDTH + VALUE_WIDTH + 160, 16 + int(6.5 * max(len(title), len(subtitle))))
    height = TOP + ROW_HEIGHT * max(1, len(bars)) + 40
    scale = BAR_WIDTH / ((x_max - low) or 1.0)

    def x(value: float) -> float:
        return LABEL_WIDTH + (value - low) * scale

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="8" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
             f'<text x="8" y="36" fill="#555">{escape(subtitle)}</text>']
    if not bars and empty_text:
        parts.append(f'<text x="8" y="{TOP + 12}">{escape(empty_text)}</text>')
    for i, bar in enumerate(bars):
        y = TOP + i * ROW_HEIGHT
        x0, x1 = sorted((x(0.0), x(bar.value)))
        parts.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + 12}" text-anchor="end">{escape(_short(bar.label))}'
                     f'<title>{escape(bar.label)}</title></text>')
        tooltip = f"<title>{escape(bar.tooltip)}</title>" if bar.tooltip else ""
        parts.append(f'<rect class="{escape(("bar " + bar.css_class).strip())}" x="{x0:.1f}" y="{y + 2}" '
                     f'width="{max(x1 - x0, 0.5):.1f}" height="{ROW_HEIGHT - 4}" fill="{bar.color}">{tooltip}</rect>')
        text = value_format.format(bar.value) + (f"  {bar.note}" if bar.note else "")
        parts.append(f'<text x="{LABEL_WIDTH + BAR_WIDTH + 6}" y="{y + 12}">{escape(text)}</text>')
    bottom = TOP + ROW_HEIGHT * max(1, len(bars))
    if low < 0:
        parts.append(f'<line x1="{x(0.0):.1f}" x2="{x(0.0):.1f}" y1="{TOP}" y2="{bottom}" stroke="black"/>')
    for j, m in enumerate(markers):
        parts.append(f'<line x1="{x(m.value):.1f}" x2="{x(m.value):.1f}" y1="{TOP}" y2="{bottom}" '
                     f'stroke="{m.color}" stroke-dasharray="4,3"/>')
        parts.append(f'<text x="{LABEL_WIDTH + j * 200}" y="{bottom + 20}" fill="{m.color}">'
                     f'{escape(m.label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write(path: Union[str, Path], svg: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".svg":
        raise ConfigError(f"save_plot writes SVG; give a path ending in .svg, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg, encoding="utf-8")
    return path


def _short(label: str, limit: int = 42) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1):]
