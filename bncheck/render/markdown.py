"""``--format markdown``: for a GitHub Actions step summary or a PR comment."""
from __future__ import annotations

from . import RenderOptions
from .format import (DRIFT_LEGEND, DRIFT_MARK, data_text, drift_bar, gate_text, interval_text, momentum_text, num, pct,
                     shown_layers, signed_points, stopped_text, train_stats_text)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _findings(findings) -> list[str]:
    if not findings:
        return ["No findings."]
    lines = ["| severity | code | layers | message | fix |", "|---|---|---|---|---|"]
    for f in findings:
        layers = ", ".join(f"`{n}`" for n in f.layers[:4]) + (" …" if len(f.layers) > 4 else "")
        lines.append(f"| {f.severity.value} | `{f.code}` | {layers} | {_escape(f.message)} | {_escape(f.fix)} |")
    return lines


class MarkdownRenderer:
    def __init__(self, options: RenderOptions = RenderOptions()):
        self.options = options

    def diagnosis(self, report) -> str:
        icon = "✅" if report.passed else "❌"
        m = report.metrics
        interval = f" (95% interval {interval_text(report.gate)})" if report.gate.interval is not None else ""
        stopped = f" {stopped_text(report.data)}." if stopped_text(report.data) else ""
        lines = [f"## {icon} bncheck: {report.verdict.value.upper()}", "",
                 f"{gate_text(report.gate)}{interval}; {data_text(report.data)}, task {report.task}.{stopped}", "",
                 "| mode | loss | accuracy |", "|---|---:|---:|",
                 f"| eval (running stats) | {num(m.eval.loss)} | {pct(m.eval.accuracy)} |",
                 f"| train-mode BN (dropout off) | {num(m.train.loss)} | {pct(m.train.accuracy)} |"]
        if m.train_with_dropout is not None:
            lines.append(f"| model.train() (dropout on) | {num(m.train_with_dropout.loss)} | "
                         f"{pct(m.train_with_dropout.accuracy)} |")
        lines += [f"| **gap** | {num(report.gap.loss)} | {signed_points(report.gap.accuracy)} |", ""]
        shown = shown_layers(report.layers, self.options)
        if shown:
            lines += [f"### Norm layers by drift ({len(shown)} of {len(report.layers)})", "",
                      "| layer | type | drift | | mean shift max | var ratio max | momentum | updates | train |",
                      "|---|---|---:|---|---:|---:|---:|---:|---|"]
            for l in shown:
                lines.append(f"| `{l.name}` | {l.type} | {num(l.drift, 3)} | `{drift_bar(l.drift, 12)}` | "
                             f"{num(l.mean_shift_max, 3)} | {num(l.var_ratio_max, 3)} | {momentum_text(l)} | "
                             f"{'n/a' if l.num_batches_tracked is None else l.num_batches_tracked} | "
                             f"{train_stats_text(l)} |")
            lines += ["", f"_{DRIFT_LEGEND.replace(DRIFT_MARK, f'`{DRIFT_MARK}`').replace('░', '`░`')}._", ""]
        lines += ["### Findings", ""] + _findings(report.findings) + [""]
        lines += [f"_note: {note}_" for note in report.notes]
        return "\n".join(lines).rstrip() + "\n"

    def inspection(self, report) -> str:
        icon = "✅" if report.passed else "❌"
        lines = [f"## {icon} bncheck inspect: {report.verdict.value.upper()}", "",
                 "| layer | type | momentum | updates | frozen |", "|---|---|---:|---:|---|"]
        for l in shown_layers(report.layers, self.options):
            lines.append(f"| `{l.name}` | {l.type} | {momentum_text(l)} | "
                         f"{'n/a' if l.num_batches_tracked is None else l.num_batches_tracked} | "
                         f"{'yes' if l.params_frozen else 'no'} |")
        lines += ["", "### Findings", ""] + _findings(report.findings)
        return "\n".join(lines) + "\n"

    def recalibration(self, result) -> str:
        lines = [f"## bncheck recalibrate: {result.layers_updated} layers", ""]
        if result.evaluations:
            lines += ["| data | loss before | loss after | accuracy before | accuracy after |", "|---|---:|---:|---:|---:|"]
        else:
            lines.append("Not evaluated (`--no-eval`).")
        for row in result.evaluations:
            lines.append(f"| {row.data} | {num(row.before.loss)} | {num(row.after.loss)} | "
                         f"{pct(row.before.accuracy)} | {pct(row.after.accuracy)} |")
        for layer in result.kept_layers:
            lines.append(f"\nKept `{layer.name}`: {layer.reason}.")
        if result.output_path:
            lines += ["", f"Wrote `{result.output_path}`."]
        return "\n".join(lines) + "\n"
