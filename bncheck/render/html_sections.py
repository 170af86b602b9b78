"""Sections of the HTML report built from plain record fields: metrics, data, layer tables and lists."""
from __future__ import annotations

from .format import kept_by_reason, momentum_text, num, pct, relative_text, signed_points
from .html_page import esc

NAME_CHARS_MAX = 48  # longer layer names break after a dot


def layer_badges(layer) -> str:
    """Short marks for what makes a layer behave unlike a plain BatchNorm layer; the tooltip explains."""
    badges = []
    if not layer.batch_stats_in_train:
        badges.append(("warn", "running stats in training", "normalises with its running statistics under "
                       "model.train() too (kept in eval by an overridden train(), or a frozen-BN layer)"))
    if layer.running_stats_corrupt:
        badges.append(("bad", "corrupt stats", "NaN or inf in the running statistics, or a negative variance"))
    if layer.running_stats_at_init:
        badges.append(("warn", "at init 0/1", "running mean all 0 and running variance all 1"))
    if not layer.tracks_running_stats:
        badges.append(("warn", "no running stats", "track_running_stats=False: batch statistics in eval too"))
    if layer.params_frozen:
        badges.append(("", "frozen", "affine parameters have requires_grad=False"))
    if layer.calls_per_forward > 1:
        badges.append(("warn", f"called {layer.calls_per_forward:g}×", "one module used at several places"))
    return "".join(f'<span class="badge {css}" title="{esc(tip)}">{esc(text)}</span>' for css, text, tip in badges)


def name_cell(layer) -> str:
    """The full name, breakable after its dots only, and the layer's marks under it."""
    name = "<wbr>".join(esc(part) + "." for part in layer.name.split("."))[:-1]
    marks = layer_badges(layer)
    return f'<td class="name"><span class="name">{name}</span>{f"<br>{marks}" if marks else ""}</td>'


def layer_table(table_id: str, caption: str, headers: list[tuple[str, str]], rows: list[str], layers) -> str:
    """A table of layers whose name column is wide enough for the names, up to a point, then breaks
    them after their dots."""
    chars = min(max((len(l.name) for l in layers), default=10), NAME_CHARS_MAX)
    # A monospace character is about 0.6em wide; the cell's padding comes on top.
    width = f' style="min-width: calc({chars * 0.6:.1f}em + 24px)"'
    head = "".join(f'<th scope="col" class="{css}"{width if text == "layer" else ""}>{esc(text)}</th>'
                   for text, css in headers)
    body = "\n".join(rows)  # a row a line, for readable diffs of the golden files
    return (f'<table class="layers" id="{table_id}"><caption>{esc(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>")


def _interval(ci, text) -> str:
    return "" if ci is None else f'<span class="ci">95% interval {esc(text(ci[0]))} to {esc(text(ci[1]))}</span>'


def metrics_section(report) -> str:
    m, gap = report.metrics, report.gap
    modes = [("eval mode (running statistics)", m.eval), ("train-mode BN (batch statistics, dropout off)", m.train)]
    if m.train_with_dropout is not None:
        modes.append(("model.train() (dropout on)", m.train_with_dropout))
    counted = any(mode.num_samples is not None for _, mode in modes)

    def samples(mode) -> str:
        return f'<td class="num">{"" if mode.num_samples is None else mode.num_samples}</td>' if counted else ""

    rows = [f'<tr><th scope="row">{esc(label)}</th><td class="num">{num(mode.loss)}</td>'
            f'<td class="num">{pct(mode.accuracy)}</td>{samples(mode)}</tr>' for label, mode in modes]
    relative = "" if gap.relative_loss is None else f'<span class="ci">{esc(relative_text(gap.relative_loss))}</span>'
    rows.append(f'<tr class="gap"><th scope="row">gap</th>'
                f'<td class="num">{num(gap.loss)}{relative}{_interval(gap.relative_loss_ci, pct)}</td>'
                f'<td class="num">{signed_points(gap.accuracy)}{_interval(gap.accuracy_ci, signed_points)}</td>'
                f'{"<td></td>" if counted else ""}</tr>')
    extra = ""
    if report.agreement is not None:
        extra = (f'<p class="muted">train/eval prediction agreement {pct(report.agreement)}, mean output '
                 f"divergence {num(report.output_divergence, 3)}</p>")
    return ("<section><h2>Eval mode vs train-mode BatchNorm</h2><table><caption>gap: eval minus train-mode loss, "
            "train-mode minus eval accuracy</caption><thead><tr><th>mode</th>"
            '<th class="num">loss</th><th class="num">accuracy</th>'
            f"{'<th class=num>samples</th>' if counted else ''}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{extra}</section>")


def data_line(report) -> str:
    d = report.data
    batches = f"{d.num_batches} batch{'' if d.num_batches == 1 else 'es'}"
    return f"{d.num_samples} samples in {batches}, task {report.task}, {report.framework} on {report.device}"


def data_facts(report) -> list[tuple[str, str]]:
    d = report.data
    facts = [("samples", str(d.num_samples)), ("batches", str(d.num_batches)),
             ("batch size", "as the loader yields" if d.batch_size is None else str(d.batch_size)),
             ("batching", f"seeded shuffle, seed {d.seed}" if d.reshuffled else "batches as your loader yields them")]
    if d.stopped_early:
        available = "" if d.num_samples_available is None else f" of {d.num_samples_available}"
        facts.append(("stopped early", f"yes: the verdict was settled after {d.num_samples}{available} samples"))
    if d.world_size > 1:
        facts.append(("processes", f"{d.world_size} (the data was sharded over them)"))
    if d.num_classes_seen is not None:
        facts.append(("classes seen", str(d.num_classes_seen)))
    if d.mean_majority_share is not None:
        facts.append(("majority class per batch", pct(d.mean_majority_share)))
    facts += [("task", report.task), ("framework", report.framework), ("device", report.device)]
    return facts


def attribution_section(attribution) -> str:
    if attribution is None:
        return ""
    a = attribution
    return ("<section><h2>What exact statistics recover</h2><p>"
            f"Fixing the top {len(a.layers)} layers together: eval accuracy {pct(a.top_fixed.accuracy)}, loss "
            f"{num(a.top_fixed.loss)}, recovers {pct(a.top_fixed.recovered_share)} of the gap; every layer fixed "
            f"recovers {pct(a.all_fixed.recovered_share)} ({a.num_forwards} extra eval forwards on "
            f"{a.num_batches} batches).</p></section>")


def inspection_table(layers) -> str:
    rows = []
    for i, l in enumerate(layers, 1):
        rows.append(f'<tr id="layer-{i}"><td class="num">{i}</td>{name_cell(l)}'
                    f'<td>{esc(l.type)}</td><td class="num">{"n/a" if l.num_features is None else l.num_features}</td>'
                    f'<td class="num">{esc(momentum_text(l))}</td>'
                    f'<td class="num">{"n/a" if l.num_batches_tracked is None else l.num_batches_tracked}</td>'
                    f'<td class="num">{num(l.initial_weight, 3)}</td><td>{"train" if l.training else "eval"}</td></tr>')
    headers = [("#", "num"), ("layer", ""), ("type", ""), ("features", "num"), ("momentum", "num"),
               ("updates", "num"), ("weight on init", "num"), ("mode", "")]
    caption = ("weight on init: the share the moving average still gives its initial 0/1 values; "
               "mode: as the model was handed over")
    return layer_table("layer-table", caption, headers, rows, layers)


def evaluation_table(evaluations) -> str:
    rows = "".join(f'<tr><th scope="row">{esc(e.data)}</th><td class="num">{num(e.before.loss)}</td>'
                   f'<td class="num">{num(e.after.loss)}</td><td class="num">{pct(e.before.accuracy)}</td>'
                   f'<td class="num">{pct(e.after.accuracy)}</td></tr>' for e in evaluations)
    head = "".join(f'<th class="num">{h}</th>' for h in ("loss before", "loss after", "accuracy before",
                                                          "accuracy after"))
    return f"<table><thead><tr><th>data</th>{head}</tr></thead><tbody>{rows}</tbody></table>"


def kept_layers(kept) -> str:
    """The layers recalibration left as they were, grouped by why."""
    return "".join(layer_names("Kept as they were", names, reason[:1].upper() + reason[1:] + "; --include-frozen "
                               "or --layers recomputes them too.") for reason, names in kept_by_reason(kept).items())


def layer_names(title: str, names, explanation: str) -> str:
    if not names:
        return ""
    listed = ", ".join(f"<code>{esc(n)}</code>" for n in names)
    note = f'<p class="muted">{esc(explanation)}</p>' if explanation else ""
    return f'<section><h2>{esc(title)} ({len(names)})</h2>{note}<div class="layer-list">{listed}</div></section>'
