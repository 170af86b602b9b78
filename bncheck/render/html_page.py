"""The frame of an HTML report: one self-contained page, its stylesheet and text escaping.

Nothing is fetched: styles are inline, charts are inline SVG, and a Content-Security-Policy
forbids any load, so the file works offline and cannot call out when opened.
"""
from __future__ import annotations

import html
import re

from .. import __version__

# Nothing may load: no scripts, images, fonts, frames or connections; only the inline styles.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'"

STYLE = """
:root { color-scheme: light dark;
  --bg: #ffffff; --fg: #1d232a; --muted: #5b6570; --line: #d5dbe1; --panel: #f4f6f8;
  --ok: #2f8f4e; --notice: #c98a00; --high: #cc3a2f; --nan: #8a3ffc; --none: #9aa4ae;
  --pass-bg: #e5f4ea; --fail-bg: #fbe7e5; --code-bg: #eef1f4; --accent: #2a62c9; }
@media (prefers-color-scheme: dark) { :root {
  --bg: #14181d; --fg: #e3e8ed; --muted: #9aa6b2; --line: #343c45; --panel: #1c2229;
  --ok: #4cc07a; --notice: #e6ad2e; --high: #f0675c; --nan: #b794ff; --none: #6c7682;
  --pass-bg: #163322; --fail-bg: #3d1c1a; --code-bg: #232a32; --accent: #7aa7ff; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 30px; margin: 0; letter-spacing: .02em; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
p { margin: 6px 0; }
code, .name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 13px; }
code { background: var(--code-bg); padding: 1px 5px; border-radius: 4px; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
.verdict { border-radius: 10px; padding: 18px 22px; border-left: 10px solid; }
.verdict.pass { background: var(--pass-bg); border-color: var(--ok); }
.verdict.fail { background: var(--fail-bg); border-color: var(--high); }
.verdict.done { background: var(--panel); border-color: var(--accent); }
.verdict .command { color: var(--muted); font-size: 14px; margin: 0 0 2px; }
.verdict .gate { font-size: 18px; margin-top: 4px; }
.pass h1 { color: var(--ok); } .fail h1 { color: var(--high); } .done h1 { color: var(--accent); }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-weight: 600; background: var(--panel); }
tbody th { font-weight: 400; background: none; }
caption { text-align: left; color: var(--muted); padding: 0 0 6px; caption-side: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.gap td { font-weight: 600; }
.ci { display: block; font-weight: 400; color: var(--muted); font-size: 13px; }
.layers { width: 100%; font-size: 13.5px; }
.layers thead th { position: sticky; top: 0; z-index: 1; }
.layers td.name .name { overflow-wrap: anywhere; }
.layers td.bar { white-space: nowrap; padding-right: 2px; }
.layers tr.none td { color: var(--muted); }
.badge { display: inline-block; font-size: 12px; line-height: 1.3; padding: 0 6px; border-radius: 9px;
  border: 1px solid var(--line); margin: 1px 2px 1px 0; white-space: nowrap; }
.badge.warn { border-color: var(--notice); color: var(--notice); }
.badge.bad { border-color: var(--high); color: var(--high); }
figure { margin: 8px 0 0; }
figcaption, .legend { color: var(--muted); font-size: 13.5px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0; }
.legend svg { vertical-align: -2px; margin-right: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart.narrow { max-width: 760px; }
svg text { fill: var(--muted); font-size: 12px; font-family: inherit; } svg text.small { font-size: 10px; }
svg .axis, svg .grid { stroke: var(--line); stroke-width: 1; }
svg text.threshold-label { fill: var(--fg); }
svg .threshold { stroke: var(--fg); stroke-width: 1.5; stroke-dasharray: 5 4; stroke-opacity: .75; }
svg .track { fill: var(--panel); stroke: var(--line); }
svg .ok { fill: var(--ok); } svg .notice { fill: var(--notice); } svg .high { fill: var(--high); }
svg .nan { fill: var(--nan); } svg .none { fill: var(--none); }
svg .hollow { fill-opacity: .18; stroke-width: 1.5; }
svg .hollow.ok { stroke: var(--ok); } svg .hollow.notice { stroke: var(--notice); }
svg .hollow.high { stroke: var(--high); } svg .hollow.nan { stroke: var(--nan); }
svg .cap { fill: var(--fg); } svg .eval-in-train { fill: var(--notice); } svg .after { fill: var(--accent); }
svg .hit { fill: transparent; } svg g:hover .hit { fill: var(--line); }
svg .start { stroke: var(--fg); stroke-width: 1; stroke-dasharray: 2 3; }
svg text.start-label { fill: var(--fg); }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--line); border-radius: 8px;
  padding: 10px 16px; margin: 10px 0; break-inside: avoid; }
.finding.error { border-left-color: var(--high); } .finding.warning { border-left-color: var(--notice); }
.finding.info { border-left-color: var(--accent); }
.finding h3 { margin: 0 0 4px; font-size: 16px; }
.severity { text-transform: uppercase; font-size: 12px; letter-spacing: .06em; margin-right: 8px; }
.error .severity { color: var(--high); } .warning .severity { color: var(--notice); }
.info .severity { color: var(--accent); }
.finding .fix { white-space: pre-line; }
.finding .fix::before { content: "Fix: "; font-weight: 600; }
.layer-list { max-height: 9em; line-height: 1.5; overflow: auto; margin: 4px 0; font-size: 13px; }
.layer-list a { color: inherit; }
.evidence { color: var(--muted); font-size: 13px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; margin: 6px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.notice-box { background: var(--panel); border-radius: 6px; padding: 6px 12px; }
footer { margin-top: 36px; color: var(--muted); font-size: 13px; }
@media print {
  :root { color-scheme: light;
    --bg: #ffffff; --fg: #000000; --muted: #444c55; --line: #c4ccd4; --panel: #f1f3f5;
    --ok: #2f8f4e; --notice: #b27a00; --high: #c0392b; --nan: #7a33e6; --none: #9aa4ae;
    --pass-bg: #e5f4ea; --fail-bg: #fbe7e5; --code-bg: #eef1f4; --accent: #2a62c9; }
  * { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  body { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  figure, .verdict, tr, .finding p { break-inside: avoid; }
  .finding { break-inside: auto; }  /* a finding that lists a hundred layers may run onto the next page */
  .finding h3 { break-after: avoid; }
  .layers thead th { position: static; }
  .layers { font-size: 8.5pt; }
  .layers th, .layers td { padding: 2px 5px; }
  code, .name { font-size: 8pt; }
  .layer-list { max-height: none; overflow: visible; }
  a { text-decoration: none; }
}
"""


def esc(value) -> str:
    """Text for an HTML element or attribute: every user-controlled string goes through here."""
    return html.escape(str(value), quote=True)


def prose(text: str) -> str:
    """Escaped text whose `backticked` spans become <code>, as in the findings' fixes."""
    parts = re.split(r"`([^`]+)`", text)
    return "".join(f"<code>{esc(part)}</code>" if i % 2 else esc(part) for i, part in enumerate(parts))


def page(title: str, body: str) -> str:
    """A complete document; ``body`` is already HTML."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CONTENT_SECURITY_POLICY}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"color-scheme\" content=\"light dark\">\n"
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n"
        f"<footer>Written by bncheck <span class=\"version\">{esc(__version__)}</span>.</footer>\n"
        "</main>\n</body>\n</html>\n"
    )
