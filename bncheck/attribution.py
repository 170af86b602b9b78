"""Per-layer attribution: how much of the eval/train gap each layer's statistics cost.

For the most drifted layers, eval mode is re-run on the plan's first few batches with only
that layer's running statistics replaced by the true ones, then with those layers together,
then with every layer. Cost: ``top + 4`` forwards of each of ``num_batches`` batches (eval
and train-mode references, one per layer, the top layers together, every layer), shared
between processes like any pass.
"""
from __future__ import annotations

from dataclasses import replace

from .engine import PassResult, PassSpec, run_pass
from .frameworks import ForwardMode
from .outcomes import EVAL, TRAIN, mode_metrics
from .report import Attribution, AttributionSummary, LayerReport, ModeMetrics
from .run import Run


def attribute_gap(run: Run, result: PassResult, layer_reports: list[LayerReport], *, top: int, num_batches: int):
    run.plan.require_reiterable("--attribute")
    reference = run_pass(run, PassSpec(collect_stats=False, limit=num_batches))
    baseline = mode_metrics(reference.outcomes, EVAL)
    target = mode_metrics(reference.outcomes, TRAIN)
    fixable = [l for l in layer_reports if l.drift is not None and l.name in result.layer_stats]
    chosen = [l.name for l in fixable[:top]]

    def evaluate_with_true_stats(names) -> Attribution:
        snapshot = run.adapter.snapshot()
        try:
            for name in names:
                stats = result.layer_stats[name]
                run.layer(name).write_running_stats(stats.mean, stats.var, stats.var_unbiased)
            outcome = run_pass(run, PassSpec(modes=(ForwardMode.EVAL,), collect_stats=False, limit=num_batches))
        finally:
            run.adapter.restore(snapshot)
        fixed = mode_metrics(outcome.outcomes, EVAL)
        return Attribution(fixed.loss, fixed.accuracy, recovered_share(baseline, target, fixed))

    per_layer = {name: evaluate_with_true_stats([name]) for name in chosen}
    top_fixed = evaluate_with_true_stats(chosen)
    all_fixed = evaluate_with_true_stats([l.name for l in fixable])
    summary = AttributionSummary(tuple(chosen), top_fixed, all_fixed, baseline, target, reference.num_batches,
                                 num_forwards=(len(chosen) + 4) * reference.num_batches)
    updated = [replace(l, attribution=per_layer.get(l.name)) for l in layer_reports]
    return summary, updated


def recovered_share(baseline: ModeMetrics, target: ModeMetrics, fixed: ModeMetrics,
                    min_gap: float = 0.01) -> float | None:
    """Share of the baseline-to-target gap that ``fixed`` closes (1 = fully, 0 = not at all).

    Accuracy when eval mode trails train mode by at least ``min_gap``, else loss when it is
    worse by ``min_gap`` relative; None otherwise: a share of no gap means nothing.
    """
    if baseline.accuracy is not None and target.accuracy is not None and fixed.accuracy is not None:
        gap = target.accuracy - baseline.accuracy
        if gap >= min_gap:
            return (fixed.accuracy - baseline.accuracy) / gap
    if baseline.loss is None or target.loss is None or fixed.loss is None:
        return None
    gap = baseline.loss - target.loss
    if gap < min_gap * max(1.0, abs(target.loss)):
        return None
    return (baseline.loss - fixed.loss) / gap
