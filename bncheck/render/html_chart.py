"""Inline SVG charts for the HTML report, on the drift scale the text bars use.

Styling comes from the page's classes, so the charts follow the light, dark and print schemes.
"""
from __future__ import annotations

import math

from ..findings import DRIFT_HIGH, DRIFT_NOTICEABLE
from .format import DRIFT_SCALE, drift_fill, num, pct
from .html_page import esc

WIDTH, LEFT, RIGHT, TOP, PLOT_HEIGHT = 960, 58, 74, 30, 200
LABELLED_MAX = 72  # up to this many layers each bar is named under the axis; beyond, index ticks
STEEP_FROM = 41    # from this many layers the names stand steeper and smaller, so neighbours do not touch


def drift_class(value: float | None) -> str:
    if value is None:
        return "none"
    if math.isnan(value):
        return "nan"
    return "high" if value > DRIFT_HIGH else "notice" if value > DRIFT_NOTICEABLE else "ok"


def short_name(name: str, limit: int = 22) -> str:
    """The last dotted parts of a name that fit, where layers differ; the full name is in the tooltip
    and the table."""
    if len(name) <= limit:
        return name
    parts = name.split(".")
    tail = parts.pop()
    while parts and len(parts[-1]) + len(tail) + 2 <= limit:
        tail = parts.pop() + "." + tail
    return "…" + (tail if len(tail) < limit else tail[-(limit - 1):])


def _y(fill: float) -> float:
    return TOP + PLOT_HEIGHT * (1 - fill)


def _grid() -> list[str]:
    parts = []
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = _y(value / DRIFT_SCALE)
        label = f"{value:g}+" if value == DRIFT_SCALE else f"{value:g}"
        css = "axis" if value == 0 else "grid"  # the threshold is drawn over the bars
        parts.append(f'<line class="{css}" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    middle = TOP + PLOT_HEIGHT / 2
    parts.append(f'<text x="12" y="{middle:.0f}" text-anchor="middle" transform="rotate(-90 12 {middle:.0f})">'
                 "drift (true std)</text>")
    return parts


def _threshold() -> list[str]:
    """Drawn over the bars, so one sees which bars cross it; labelled in the right margin."""
    y = _y(DRIFT_HIGH / DRIFT_SCALE)
    return [f'<line class="threshold" x1="{LEFT}" x2="{WIDTH - RIGHT + 4}" y1="{y:.1f}" y2="{y:.1f}"/>',
            f'<text class="threshold-label" x="{WIDTH - RIGHT + 8}" y="{y - 3:.1f}">findings</text>',
            f'<text class="threshold-label" x="{WIDTH - RIGHT + 8}" y="{y + 11:.1f}">start</text>']


def layer_tooltip(position: int, layer) -> str:
    flags = "" if layer.batch_stats_in_train else "; running statistics in training too"
    return (f"#{position} {layer.name} ({layer.type}): drift {num(layer.drift, 3)}, "
            f"mean shift {num(layer.mean_shift_max, 3)}, var ratio {num(layer.var_ratio_max, 3)}{flags}")


def _bar(x: float, width: float, layer, position: int) -> str:
    value = layer.drift
    css = _bar_class(layer)
    fill = drift_fill(value)
    hit = f'<rect class="hit" x="{x:.2f}" y="{TOP}" width="{width:.2f}" height="{PLOT_HEIGHT}"/>'
    if value is None:
        shape = f'<rect class="none" x="{x:.2f}" y="{_y(0) - 2:.1f}" width="{width:.2f}" height="2"/>'
    else:
        top = TOP if fill is None else min(_y(fill), _y(0) - 1)  # NaN: full height; a drift > 0 shows
        height = _y(0) - top if fill is None or value > 0 else 0
        shape = f'<rect class="{css}" x="{x:.2f}" y="{top:.1f}" width="{width:.2f}" height="{height:.1f}"/>'
        if value > DRIFT_SCALE:
            shape += f'<rect class="cap" x="{x:.2f}" y="{TOP - 7}" width="{width:.2f}" height="3"/>'
    if not layer.batch_stats_in_train:  # visible even when its drift is too small to see
        shape += f'<rect class="eval-in-train" x="{x:.2f}" y="{_y(0) + 2:.1f}" width="{width:.2f}" height="4"/>'
    return f"<g><title>{esc(layer_tooltip(position, layer))}</title>{hit}{shape}</g>"


def _label_style(count: int) -> tuple[int, int]:
    """Angle and font size of the names under the axis."""
    return (40, 12) if count < STEEP_FROM else (65, 10)  # the page's CSS: svg text 12px, svg text.small 10px


def _x_labels(layers, slot: float) -> list[str]:
    base = _y(0) + 6  # below the strip that marks layers using running statistics in training
    if len(layers) <= LABELLED_MAX:
        angle, size = _label_style(len(layers))
        parts = []
        for i, l in enumerate(layers):
            x = LEFT + slot * (i + 0.5) + size / 3
            small = ' class="small"' if size < 12 else ""
            parts.append(f'<text{small} x="{x:.1f}" y="{base + 12:.1f}" text-anchor="end" '
                         f'transform="rotate(-{angle} {x:.1f} {base + 12:.1f})">{esc(short_name(l.name))}</text>')
        return parts
    step = next(s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000) if len(layers) / s <= 12)
    parts = []
    for position in [1] + list(range(step, len(layers) + 1, step)):
        x = LEFT + slot * (position - 0.5)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{base:.1f}" y2="{base + 4:.1f}"/>'
                     f'<text x="{x:.1f}" y="{base + 17:.1f}" text-anchor="middle">{position}</text>')
    return parts


def first_over_threshold(layers) -> int | None:
    """Index of the first layer whose drift is over the finding threshold (or not a number)."""
    return next((i for i, l in enumerate(layers)
                 if l.drift is not None and (math.isnan(l.drift) or l.drift > DRIFT_HIGH)), None)


def _start_mark(layers, slot: float, width: float) -> list[str]:
    first = first_over_threshold(layers)
    if first is None:
        return []
    x = LEFT + slot * first + (slot - width) / 2 - min(3.0, (slot - width) / 2)  # just left of its bar
    right = first < len(layers) / 2
    label = f"drift over {DRIFT_HIGH:g} from #{first + 1} {short_name(layers[first].name, 40)}"
    return [f'<line class="start" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP - 10}" y2="{_y(0):.1f}"/>',
            f'<text class="start-label" x="{x + (4 if right else -4):.1f}" y="{TOP - 14}" '
            f'text-anchor="{"start" if right else "end"}">{esc(label)}</text>']


def drift_chart(layers, *, title: str, description: str, table_id: str, axis: str, forward: bool) -> str:
    """Drift of every layer in the order given, depth on the x axis when ``forward``; then the first
    layer over the threshold is marked, where drift starts."""
    count = max(len(layers), 1)
    slot = (WIDTH - LEFT - RIGHT) / count
    width = min(slot * (0.8 if slot >= 4 else 1.0), 36)
    labelled = len(layers) <= LABELLED_MAX
    angle, size = _label_style(len(layers))
    longest = max((len(short_name(l.name)) for l in layers), default=1)
    name_height = 0.6 * size * longest * math.sin(math.radians(angle))  # a character is ~0.6 em wide
    height = TOP + PLOT_HEIGHT + (round(42 + name_height) if labelled else 50)
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
             f'aria-labelledby="chart-title chart-desc" aria-describedby="{table_id}">',
             f'<title id="chart-title">{esc(title)}</title><desc id="chart-desc">{esc(description)}</desc>']
    parts += _grid()
    parts += [_bar(LEFT + slot * i + (slot - width) / 2, width, l, i + 1) for i, l in enumerate(layers)]
    parts += _threshold() + _x_labels(layers, slot) + (_start_mark(layers, slot, width) if forward else [])
    parts.append(f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f"{axis} →</text></svg>")
    return "\n".join(parts)


def _bar_class(layer) -> str:
    """Colour by drift; corrupt statistics get their own colour whatever number they produced."""
    kind = "nan" if layer.running_stats_corrupt and layer.drift is not None else drift_class(layer.drift)
    return kind + ("" if layer.batch_stats_in_train else " hollow")


def drift_cell(layer) -> str:
    """A small bar for a table cell, on the same scale; the number beside it carries the meaning."""
    length, mark = 80, 80 * DRIFT_HIGH / DRIFT_SCALE
    value = layer.drift
    fill = drift_fill(value)
    css = _bar_class(layer)
    width = length if fill is None else max(length * fill, 1.0 if value > 0 else 0.0)  # a drift > 0 shows
    shape = "" if value is None else f'<rect class="{css}" x="0" y="1" width="{width:.1f}" height="10"/>'
    cap = '<rect class="cap" x="81" y="0" width="3" height="12"/>' if value is not None and value > DRIFT_SCALE else ""
    return (f'<svg width="86" height="12" viewBox="0 0 86 12" aria-hidden="true">'
            f'<rect class="track" x="0" y="1" width="{length}" height="10"/>{shape}{cap}'
            f'<line class="threshold" x1="{mark:.0f}" x2="{mark:.0f}" y1="0" y2="12"/></svg>')


def accuracy_chart(evaluations) -> str:
    """Eval-mode accuracy before and after recalibration, per data set, on 0 to 100%."""
    rows = [e for e in evaluations if all(a is not None and math.isfinite(a) for a in (e.before.accuracy,
                                                                                    e.after.accuracy))]
    if not rows:
        return ""
    left, length, row_height = 110, 480, 46
    height = 30 + row_height * len(rows)
    parts = [f'<svg class="chart narrow" viewBox="0 0 {left + length + 110} {height}" role="img" '
             f'aria-labelledby="acc-title"><title id="acc-title">Eval-mode accuracy before and after, '
             f"per data set</title>"]
    for share in (0.0, 0.5, 1.0):
        x = left + length * share
        parts.append(f'<line class="grid" x1="{x:.0f}" x2="{x:.0f}" y1="4" y2="{height - 20}"/>'
                     f'<text x="{x:.0f}" y="{height - 6}" text-anchor="middle">{share:.0%}</text>')
    for i, row in enumerate(rows):
        y = 8 + row_height * i
        parts.append(f'<text x="{left - 10}" y="{y + 22}" text-anchor="end">{esc(short_name(row.data, 14))}</text>')
        for j, (label, value, css) in enumerate((("before", row.before.accuracy, "none"),
                                                 ("after", row.after.accuracy, "after"))):
            top = y + 2 + 20 * j
            parts.append(f'<rect class="track" x="{left}" y="{top}" width="{length}" height="16"/>'
                         f'<rect class="{css}" x="{left}" y="{top}" width="{length * value:.1f}" height="16"/>'
                         f'<text x="{left + length + 8}" y="{top + 13}">{label} {pct(value)}</text>')
    return "".join(parts) + "</svg>"
