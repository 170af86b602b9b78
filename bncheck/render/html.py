"""``--format html``: one self-contained page with the verdict, a drift-by-depth chart and the findings.

Pure string building from the result records; every user-controlled string is escaped.
"""
from __future__ import annotations

import math

from ..findings import DRIFT_HIGH, DRIFT_NOTICEABLE
from . import RenderOptions
from .format import DRIFT_SCALE, gate_text, momentum_text, num, pct
from .html_chart import accuracy_chart, drift_cell, drift_chart, first_over_threshold
from .html_page import esc, page, prose
from .html_sections import (
    attribution_section, data_facts, data_line, evaluation_table, inspection_table, kept_layers, layer_names,
    layer_table, metrics_section, name_cell,
)

LAYER_LIST_MAX = 300  # layer names listed under a finding before "and N more"


def forward_order(layers) -> tuple[list, str | None]:
    """Layers in forward order (``LayerReport.order``), and a note on what could not be placed."""
    known = sorted((l for l in layers if l.order is not None), key=lambda l: l.order)
    unknown = [l for l in layers if l.order is None]
    if not known:
        return list(layers), "The forward order of the layers is not known here: they are shown in the order " \
                             "the report lists them, not by depth."
    if unknown:
        return known + unknown, f"{len(unknown)} norm layer{'s' if len(unknown) > 1 else ''} never ran in the " \
                                "forward pass: listed last."
    return known, None


def _header(command: str, verdict: str, css: str, lines: list[str]) -> str:
    body = "".join(f'<p class="{"gate" if i == 0 else "muted"}">{line}</p>' for i, line in enumerate(lines))
    return (f'<header class="verdict {css}"><p class="command">{esc(command)}</p>'
            f"<h1>{esc(verdict)}</h1>{body}</header>")


def _ratio_range(layer) -> str:
    if layer.var_ratio_min is None or layer.var_ratio_max is None:
        return "n/a"
    return f"{num(layer.var_ratio_min, 3)} – {num(layer.var_ratio_max, 3)}"


def _diagnosis_rows(layers, attribution: bool) -> list[str]:
    rows = []
    for i, l in enumerate(layers, 1):
        cells = [f'<td class="num">{i}</td>', name_cell(l), f"<td>{esc(l.type)}</td>",
                 f'<td class="bar">{drift_cell(l)} {num(l.drift, 3)}</td>',
                 f'<td class="num">{num(l.drift_max, 3)}</td>',
                 f'<td class="num">{num(l.mean_shift_max, 3)}</td>', f'<td class="num">{_ratio_range(l)}</td>',
                 f'<td class="num">{esc(momentum_text(l))}</td>',
                 f'<td class="num">{"n/a" if l.num_batches_tracked is None else l.num_batches_tracked}</td>']
        if attribution:
            cells.append(f'<td class="num">{pct(l.attribution.recovered_share) if l.attribution else ""}</td>')
        css = ' class="none"' if l.drift is None else ""
        rows.append(f'<tr id="layer-{i}"{css}>{"".join(cells)}</tr>')
    return rows


def _legend(layers) -> str:
    """The colours, and the marks only where some layer has them."""
    def swatch(css: str) -> str:
        return (f'<svg width="14" height="12" aria-hidden="true">'
                f'<rect class="{css}" x="1" y="1" width="12" height="10"/></svg>')

    drifts = [l.drift for l in layers if l.drift is not None]
    items = [(swatch("ok"), f"up to {DRIFT_NOTICEABLE:g}"),
             (swatch("notice"), f"{DRIFT_NOTICEABLE:g} to {DRIFT_HIGH:g}"),
             (swatch("high"), f"over {DRIFT_HIGH:g}: findings start here")]
    if any(d > DRIFT_SCALE for d in drifts):
        items.append((swatch("cap"), f"mark above a bar: beyond {DRIFT_SCALE:g}, drawn full"))
    if any(math.isnan(d) for d in drifts) or any(l.running_stats_corrupt for l in layers):
        items.append((swatch("nan"), "corrupt running statistics (NaN or inf), or a drift that is not a number"))
    if any(not l.batch_stats_in_train for l in layers):
        items.append((swatch("eval-in-train"), "strip under the axis: normalises with its running statistics in "
                                               "training too (bar drawn pale)"))
    if len(drifts) < len(layers):
        items.append((swatch("none"), "line on the axis: no drift measured"))
    return '<div class="legend">' + "".join(f"<span>{s}{esc(t)}</span>" for s, t in items) + "</div>"


def _chart_description(layers) -> str:
    measured = [l for l in layers if l.drift is not None]
    over = [l for l in measured if math.isnan(l.drift) or l.drift > DRIFT_HIGH]
    first = first_over_threshold(layers)
    text = (f"Drift of {len(layers)} norm layers on a fixed scale from 0 to {DRIFT_SCALE:g} standard deviation, "
            f"bars beyond it drawn full; {len(over)} over the finding threshold {DRIFT_HIGH:g}")
    if first is not None:
        text += f", the first at position {first + 1}, {layers[first].name}"
    finite = [l for l in measured if not math.isnan(l.drift)]
    if finite:
        worst = max(finite, key=lambda l: l.drift)
        text += f"; the largest is {worst.name} at {num(worst.drift, 3)}"
    return text + ". The table below lists every value."


_DRIFT_HEADERS = [("#", "num"), ("layer", ""), ("type", ""), ("drift", ""), ("worst channel", "num"),
                  ("mean shift (worst)", "num"), ("var ratio (min – max)", "num"), ("momentum", "num"),
                  ("updates", "num")]


def _placement(ordered) -> str:
    return "in forward order" if ordered[0].order is not None else "in report order"


def _chart_section(ordered, order_note: str | None) -> str:
    where = _placement(ordered)
    scale = (f"Drift is the distance between the running and the true statistics of a layer's input, in true "
             f"standard deviations: 0 to {DRIFT_SCALE:g} on every chart, {DRIFT_HIGH:g} is where findings start.")
    chart = drift_chart(ordered, title=f"Drift of {len(ordered)} norm layers {where}",
                        description=_chart_description(ordered), table_id="layer-table",
                        axis=f"norm layers {where}" + (", first to last" if where == "in forward order" else ""),
                        forward=where == "in forward order")
    note = f'<p class="notice-box">{esc(order_note)}</p>' if order_note else ""
    return (f'<section><h2>Drift by depth</h2><p class="muted">{esc(scale)}</p>{note}'
            f"<figure>{chart}<figcaption>{_legend(ordered)}</figcaption></figure></section>")


def _layer_section(ordered, attribution: bool) -> str:
    headers = _DRIFT_HEADERS + ([("recovers", "num")] if attribution else [])
    caption = (f"Norm layers {_placement(ordered)}. Drift: mean over channels, its bar on the fixed 0 to "
               f"{DRIFT_SCALE:g} scale with the dashed mark at {DRIFT_HIGH:g}; mean shift in true standard "
               "deviations; variance ratio running / true.")
    table = layer_table("layer-table", caption, headers, _diagnosis_rows(ordered, attribution), ordered)
    return f"<section><h2>Norm layers</h2>{table}</section>"


def _evidence(evidence: dict) -> str:
    def value_text(value) -> str:
        if isinstance(value, float):
            return num(value, 3)
        if isinstance(value, (list, tuple)):
            return ", ".join(value_text(v) for v in value)
        return str(value)

    return "; ".join(f"{key} {value_text(value)}" for key, value in evidence.items())


def _finding(finding, anchors: dict[str, int]) -> str:
    names = [f'<a href="#layer-{anchors[n]}"><code>{esc(n)}</code></a>' if n in anchors else f"<code>{esc(n)}</code>"
             for n in finding.layers[:LAYER_LIST_MAX]]
    if len(finding.layers) > LAYER_LIST_MAX:
        names.append(f"and {len(finding.layers) - LAYER_LIST_MAX} more")
    count = len(finding.layers)
    layers = (f'<p class="muted">{count} layer{"s" if count != 1 else ""}:</p>'
              f'<div class="layer-list">{", ".join(names)}</div>') if names else ""
    evidence = f'<p class="evidence">evidence: {esc(_evidence(finding.evidence))}</p>' if finding.evidence else ""
    return (f'<article class="finding {esc(finding.severity.value)}"><h3><span class="severity">'
            f"{esc(finding.severity.value)}</span><code>{esc(finding.code)}</code></h3>{layers}"
            f'<p>{prose(finding.message)}</p><p class="fix">{prose(finding.fix)}</p>{evidence}</article>')


def _findings_section(findings, anchors: dict[str, int]) -> str:
    if not findings:
        return "<section><h2>Findings</h2><p>No findings.</p></section>"
    return "<section><h2>Findings</h2>\n" + "\n".join(_finding(f, anchors) for f in findings) + "\n</section>"


def _notes_section(notes) -> str:
    if not notes:
        return ""
    return "<section><h2>Notes</h2><ul>" + "".join(f"<li>{prose(n)}</li>" for n in notes) + "</ul></section>"


def _facts(title: str, facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return f'<section><h2>{esc(title)}</h2><dl class="facts">{rows}</dl></section>'


class HtmlRenderer:
    def __init__(self, options: RenderOptions = RenderOptions()):
        self.options = options  # the page always shows every layer: it is a file to scroll, not a terminal

    def diagnosis(self, report) -> str:
        verdict = report.verdict.value.upper()
        ordered, order_note = forward_order(report.layers)
        anchors = {l.name: i for i, l in enumerate(ordered, 1)}
        body = [_header("bncheck diagnose", verdict, report.verdict.value, [esc(gate_text(report.gate)),
                                                                           esc(data_line(report))]),
                metrics_section(report), _chart_section(ordered, order_note) if ordered else "",
                _findings_section(report.findings, anchors), attribution_section(report.attribution),
                _layer_section(ordered, report.attribution is not None) if ordered else "",
                _facts("Data", data_facts(report)), _notes_section(report.notes)]
        return page(f"bncheck diagnose: {verdict}, {gate_text(report.gate)}", "\n".join(b for b in body if b))

    def inspection(self, report) -> str:
        verdict = report.verdict.value.upper()
        ordered, order_note = forward_order(report.layers)
        anchors = {l.name: i for i, l in enumerate(ordered, 1)}
        note = f'<p class="notice-box">{esc(order_note)}</p>' if order_note else ""
        body = [_header("bncheck inspect", verdict, report.verdict.value,
                        [esc(f"{len(report.layers)} norm layers, checked without data")]),
                _findings_section(report.findings, anchors),
                f"<section><h2>Norm layers</h2>{note}{inspection_table(ordered)}</section>",
                _facts("Model", [("framework", report.framework), ("norm layers", str(len(report.layers)))]),
                _notes_section(report.notes)]
        return page(f"bncheck inspect: {verdict}", "\n".join(b for b in body if b))

    def recalibration(self, result) -> str:
        batches = f"{result.num_batches} batch{'' if result.num_batches == 1 else 'es'}"
        lines = [esc(f"{result.layers_updated} norm layers recomputed from {result.num_samples} samples in {batches}")]
        if result.output_path:
            lines.append(f"wrote <code>{esc(result.output_path)}</code>")
        chart = accuracy_chart(result.evaluations)
        figure = f"<figure>{chart}<figcaption>Eval-mode accuracy before (grey) and after (blue) " \
                 "recalibration, 0 to 100%.</figcaption></figure>" if chart else ""
        body = [_header("bncheck recalibrate", "RECALIBRATED", "done", lines),
                f"<section><h2>Eval mode before and after</h2>{evaluation_table(result.evaluations)}{figure}</section>"
                if result.evaluations else '<section><p class="muted">Not evaluated (--no-eval).</p></section>',
                layer_names("Recomputed layers", result.updated_layers, ""),
                kept_layers(result.kept_layers)]
        return page(f"bncheck recalibrate: {result.layers_updated} layers", "\n".join(b for b in body if b))
