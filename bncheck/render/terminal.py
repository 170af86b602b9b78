"""The default human report, drawn with rich."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import RenderOptions
from .format import (DRIFT_LEGEND, data_text, drift_bar, drift_style, gate_text, interval_text, kept_by_reason,
                     momentum_text, num, pct, shown_layers, signed_points, stopped_text, train_stats_text)

def _tidy(text: str) -> str:
    """rich pads some lines to the console width; trailing spaces only get in the way of diffs."""
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


class TerminalRenderer:
    def __init__(self, options: RenderOptions = RenderOptions()):
        self.options = options

    def _console(self) -> tuple[Console, io.StringIO]:
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=self.options.color, color_system="auto" if self.options.color
                          else None, width=self.options.width, highlight=False)
        return console, buffer

    def diagnosis(self, report) -> str:
        console, buffer = self._console()
        verdict = Text("PASS", style="bold green") if report.passed else Text("FAIL", style="bold red")
        console.print(Text.assemble("bncheck diagnose: ", verdict, f"  {gate_text(report.gate)}"))
        console.print(f"{data_text(report.data)}, task: {report.task}, device: {report.device}", style="dim")
        if stopped_text(report.data):
            console.print(stopped_text(report.data), style="dim")
        metrics = Table(title="Eval mode vs train-mode BatchNorm", title_justify="left")
        metrics.add_column("mode")
        metrics.add_column("loss", justify="right")
        metrics.add_column("accuracy", justify="right")
        m = report.metrics
        metrics.add_row("eval (running stats)", num(m.eval.loss), pct(m.eval.accuracy))
        metrics.add_row("train-mode BN (batch stats, dropout off)", num(m.train.loss), pct(m.train.accuracy))
        if m.train_with_dropout is not None:
            metrics.add_row("model.train() (dropout on)", num(m.train_with_dropout.loss),
                            pct(m.train_with_dropout.accuracy), style="dim")
        metrics.add_row("gap", num(report.gap.loss), signed_points(report.gap.accuracy), style="bold")
        console.print(metrics)
        if report.gate.interval is not None:
            console.print(f"95% interval of the {report.gate.metric.replace('_', ' ')} gap: "
                          f"{interval_text(report.gate)}", style="dim")
        if report.agreement is not None:
            console.print(f"train/eval prediction agreement {pct(report.agreement)}, "
                          f"mean output divergence {num(report.output_divergence, 3)}", style="dim")
        self._layers(console, report.layers, attribution=report.attribution is not None)
        if report.attribution is not None:
            a = report.attribution
            console.print(f"Fixing the top {len(a.layers)} layers together: eval accuracy "
                          f"{pct(a.top_fixed.accuracy)}, loss {num(a.top_fixed.loss)}, recovers "
                          f"{pct(a.top_fixed.recovered_share)} of the gap; every layer fixed recovers "
                          f"{pct(a.all_fixed.recovered_share)} ({a.num_forwards} extra eval forwards "
                          f"on {a.num_batches} batches)", style="dim")
        self._findings(console, report.findings)
        for note in report.notes:
            console.print(f"note: {note}", style="dim")
        return _tidy(buffer.getvalue())

    def _layers(self, console, layers, *, attribution: bool = False) -> None:
        shown = shown_layers(layers, self.options)
        if not shown:
            return
        title = f"Norm layers by drift ({len(shown)} of {len(layers)}" + \
            ("" if len(shown) == len(layers) else "; --all-layers for all") + \
            "); shift and var ratio: the worst channel"
        table = Table(title=title, title_justify="left", caption=DRIFT_LEGEND, caption_justify="left")
        # Names stay whole where they fit; the type and the headers give way first.
        table.add_column("layer", overflow="fold", min_width=min(max(len(l.name) for l in shown), 40))
        # Keras' 18-letter BatchNormalization would push the short columns off a 120-column log.
        table.add_column("type", overflow="fold", max_width=None if self.options.width >= 130 else 14)
        for column in ("drift", "", "shift", "var ratio", "momentum", "updates", "train"):
            table.add_column(column, justify="left" if column == "" else "right", no_wrap=True)
        if attribution:
            table.add_column("recovers", justify="right")
        for l in shown:
            row = [l.name, l.type, num(l.drift, 3), Text(drift_bar(l.drift), style=drift_style(l.drift)),
                   num(l.mean_shift_max, 3), num(l.var_ratio_max, 3), momentum_text(l),
                   "n/a" if l.num_batches_tracked is None else str(l.num_batches_tracked), train_stats_text(l)]
            if attribution:
                row.append(pct(l.attribution.recovered_share) if l.attribution else "")
            table.add_row(*row)
        console.print(table)

    def _findings(self, console, findings) -> None:
        if not findings:
            console.print("No findings.", style="green")
            return
        console.print(Text("Findings", style="bold"))
        for f in findings:
            layers = f" [{', '.join(f.layers[:4])}{', …' if len(f.layers) > 4 else ''}]" if f.layers else ""
            console.print(Text.assemble((f"{f.severity.value.upper():7}", _SEVERITY_STYLE[f.severity.value]),
                                        (f" {f.code}", "bold"), layers))
            console.print(f"        {f.message}")
            console.print(f"        fix: {f.fix}", style="green")

    def inspection(self, report) -> str:
        console, buffer = self._console()
        verdict = Text("PASS", style="bold green") if report.passed else Text("FAIL", style="bold red")
        console.print(Text.assemble("bncheck inspect: ", verdict,
                                    f"  {len(report.layers)} norm layers, checked without data"))
        shown = shown_layers(report.layers, self.options)
        title = f"Norm layers ({len(shown)} of {len(report.layers)}" + \
            ("" if len(shown) == len(report.layers) else "; --all-layers for all") + ")"
        table = Table(title=title, title_justify="left")
        for column in ("layer", "type", "features", "momentum", "updates", "init weight", "frozen", "mode"):
            table.add_column(column)
        for l in shown:
            table.add_row(l.name, l.type, str(l.num_features), momentum_text(l),
                          "n/a" if l.num_batches_tracked is None else str(l.num_batches_tracked),
                          num(l.initial_weight, 3), "yes" if l.params_frozen else "no",
                          "train" if l.training else "eval")
        console.print(table)
        self._findings(console, report.findings)
        for note in report.notes:
            console.print(f"note: {note}", style="dim")
        return _tidy(buffer.getvalue())

    def recalibration(self, result) -> str:
        console, buffer = self._console()
        console.print(f"bncheck recalibrate: {result.layers_updated} norm layers recomputed from "
                      f"{result.num_samples} samples in {result.num_batches} batch"
                      f"{'' if result.num_batches == 1 else 'es'}")
        if result.evaluations:
            table = Table(title="Eval mode before and after", title_justify="left")
            for column in ("data", "loss before", "loss after", "accuracy before", "accuracy after"):
                table.add_column(column, justify="right")
            for row in result.evaluations:
                table.add_row(row.data, num(row.before.loss), num(row.after.loss), pct(row.before.accuracy),
                              pct(row.after.accuracy))
            console.print(table)
        else:
            console.print("not evaluated (--no-eval)", style="dim")
        for reason, names in kept_by_reason(result.kept_layers).items():
            console.print(f"kept {len(names)} layer{'' if len(names) == 1 else 's'} as they were "
                          f"({', '.join(names[:4])}{', …' if len(names) > 4 else ''}): {reason}", style="dim")
        if result.output_path:
            console.print(f"wrote {result.output_path}", style="green")
        return _tidy(buffer.getvalue())
