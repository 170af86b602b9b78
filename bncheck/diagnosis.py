"""``bncheck.diagnose``: measure the train/eval BatchNorm discrepancy of a model on data."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from .arguments import check_max_gap
from .averaging import averaging_hints as model_averaging_hints
from .distributed import World, current_world
from .engine import TRAIN_ON_DROPOUT_BATCHES, WITH_DROPOUT, PassResult, PassSpec, caller_rng_kept, run_pass
from .errors import InputError
from .findings import Evidence, find_causes
from .frameworks import ForwardMode
from .gating import DEFAULT_MAX_GAP, DEFAULT_MAX_RELATIVE_LOSS_GAP, StopRule, gap_of, gate_of  # noqa: F401
from .layer_report import drift_sort_key, forget_update_counts, measure_layer, unmeasured_note
from .outcomes import EVAL, TRAIN, mode_metrics
from .probes import eval_batch_dependence, first_batch
from .report import DataSummary, Gate, LayerReport, MetricsSet, Report, Verdict
from .run import Run, RunOptions, resolve_run

DEFAULT_DROPOUT_BATCHES = 1   # batches the training mode with dropout on runs on (it feeds the dropout note)


def diagnose(
    model: Any,
    data: Any,
    *,
    max_gap: float | None = None,
    quick: bool = False,
    attribute: bool = False,
    attribute_top: int = 3,
    attribute_batches: int = 8,
    dropout_batches: int = DEFAULT_DROPOUT_BATCHES,
    missing_running_stats: tuple[str, ...] = (),
    averaging_hints: tuple[str, ...] = (),
    missing_update_counts: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    progress: Callable[[int, int | None], None] | None = None,
    world: World | None = None,
    **run_options: Any,
) -> Report:
    """Compare eval-mode and train-mode BatchNorm on ``data`` and explain any gap.

    Train mode is the model's own ``model.train()`` with dropout and stochastic depth off. The
    model is never modified: every buffer, momentum and mode flag is restored. ``max_gap`` is the
    largest train-minus-eval accuracy gap that passes; for tasks without accuracy it is the
    relative loss gap (default 0.10). ``quick`` stops as soon as the gap's interval settles the
    verdict. Inside an initialised torch.distributed process group every process takes a shard of
    the data and all of them return the same report. Other keywords (``device``, ``batch_size``,
    ``seed``, ``max_batches``, ``max_samples``, ``amp``, ``channels_last``, ``loss_fn``,
    ``output_key``, ...) are :class:`~bncheck.run.RunOptions` and
    :class:`~bncheck.run.ScoringOptions`. ``averaging_hints`` say why the weights look averaged
    (SWA/EMA checkpoints); the model's own structure is checked too.
    """
    _check_arguments(max_gap, attribute_top, attribute_batches, dropout_batches)
    options = RunOptions.from_keywords(run_options)
    world = world or (current_world(options.dist_timeout) if options.distributed else World())
    with world.failing_together():
        run = resolve_run(model, data, options, world=world)
        with caller_rng_kept(run), rank_zero_statistics(run) as rank_spread:
            result = run_pass(run, _pass_spec(run, max_gap, quick, dropout_batches), progress)
            dependence = _eval_batch_dependence(run)
            layers = _layer_reports(run, result, missing_update_counts)
            metrics = _metrics(result)
            gate = _gate(result, max_gap)
            attribution = None
            if attribute:
                from .attribution import attribute_gap

                attribution, layers = attribute_gap(run, result, layers, top=attribute_top,
                                                    num_batches=attribute_batches)
        evidence = Evidence(
            layers=tuple(layers), metrics=metrics, gate=gate, reshuffled=run.plan.reshuffled,
            mean_majority_share=_majority(result), num_classes_seen=_classes(result),
            attribution=attribution, missing_running_stats=missing_running_stats, framework=run.framework,
            rank_spread=rank_spread, registration_order=tuple(layer.name for layer in run.layers),
            eval_batch_dependence=dependence, averaging_hints=tuple(averaging_hints) + model_averaging_hints(model))
        return _report(run, result, layers, metrics, gate, evidence, attribution, notes)


def _eval_batch_dependence(run: Run) -> float | None:
    """The probe runs once, where the plan's first batch is (rank 0), and every rank gets its answer."""
    found = eval_batch_dependence(run.adapter, first_batch(run.plan), run.device, scoring=run.scoring) \
        if run.world.is_main else None
    return run.world.exchange(found)[0]


def _check_arguments(max_gap, attribute_top, attribute_batches, dropout_batches) -> None:
    check_max_gap(max_gap)
    for name, value, least in (("attribute_batches", attribute_batches, 1), ("attribute_top", attribute_top, 1),
                               ("dropout_batches", dropout_batches, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")


def _pass_spec(run: Run, max_gap, quick: bool, dropout_batches: int) -> PassSpec:
    modes = (ForwardMode.EVAL, ForwardMode.NORM_TRAIN)
    if run.adapter.has_dropout() and dropout_batches:
        modes += (ForwardMode.FULL_TRAIN,)
    return PassSpec(modes, dropout_batches=dropout_batches, stop=StopRule(max_gap) if quick else None)


def _layer_reports(run: Run, result: PassResult, missing_update_counts=()) -> list[LayerReport]:
    initial = {layer.name: layer.is_training for layer in run.layers}
    reports = (measure_layer(layer, result.layer_stats.get(layer.name), forwards=result.num_batches,
                             dropout_stats=result.dropout_layer_stats.get(layer.name),
                             dropout_base=result.dropout_base_stats.get(layer.name),
                             initial_training=initial[layer.name], order=result.order.get(layer.name))
               for layer in run.layers)
    return sorted(forget_update_counts(reports, missing_update_counts), key=drift_sort_key)


def _metrics(result: PassResult) -> MetricsSet:
    return MetricsSet(eval=mode_metrics(result.outcomes, EVAL), train=mode_metrics(result.outcomes, TRAIN),
                      train_with_dropout=mode_metrics(result.outcomes, WITH_DROPOUT))


def _gate(result: PassResult, max_gap: float | None) -> Gate:
    bad = result.outcomes.nonfinite_eval_batches
    if bad:
        # NaN or inf predictions fail whatever the metric says (argmax of NaN is no prediction).
        return Gate("nonfinite_eval_outputs", bad / max(result.num_batches, 1), 0.0, False)
    return gate_of(result.task, result.outcomes, max_gap)


def _majority(result: PassResult) -> float | None:
    batches = result.outcomes.get("labels.batches")
    return result.outcomes.get("labels.share") / batches if batches else None


def _classes(result: PassResult) -> int | None:
    return len(result.outcomes.classes_seen) if result.outcomes.get("labels.batches") else None


def _report(run, result, layers, metrics, gate, evidence, attribution, notes) -> Report:
    plan = run.plan
    available = plan.num_batches and min(plan.num_batches * (plan.batch_size or 0), _plan_samples(plan))
    data = DataSummary(result.num_samples, result.num_batches,
                       None if plan.batch_size is None else min(plan.batch_size, result.num_samples),
                       plan.reshuffled, plan.seed, _majority(result), _classes(result),
                       stopped_early=result.stopped_early, num_samples_available=available or None,
                       world_size=run.world.size)
    return Report(
        verdict=Verdict.PASS if gate.passed else Verdict.FAIL, task=result.task.value, framework=run.framework,
        device=str(run.adapter.device_used(run.device)), metrics=metrics, gap=gap_of(metrics, result.outcomes),
        gate=gate, agreement=_ratio(result, "agree.a", "agree.n"), output_divergence=_ratio(result, "diverge", "agree.n"),
        layers=tuple(layers), findings=find_causes(evidence), data=data, attribution=attribution,
        notes=tuple(notes) + _dropout_note(result) + _nonfinite_note(result) + _quick_note(run, result)
        + unmeasured_note(layers))


def _plan_samples(plan) -> int:
    dataset = getattr(plan.batches, "dataset", None)
    return len(dataset) if dataset is not None else 0


def _ratio(result: PassResult, numerator: str, denominator: str) -> float | None:
    n = result.outcomes.get(denominator)
    return result.outcomes.get(numerator) / n if n else None


def _quick_note(run: Run, result: PassResult) -> tuple[str, ...]:
    if not result.stopped_early or run.plan.reshuffled:
        return ()
    return ("--quick stopped on batches as the loader yields them: the early verdict assumes they come in "
            "random order (return the Dataset to let bncheck shuffle)",)


def _nonfinite_note(result: PassResult) -> tuple[str, ...]:
    bad = result.outcomes.nonfinite_eval_batches
    if not bad:
        return ()
    return (f"eval-mode outputs held NaN or inf in {bad} of {result.num_batches} batches (train-mode outputs were "
            "finite): the verdict is FAIL",)


def _dropout_note(result: PassResult) -> tuple[str, ...]:
    """Say so when model.train() scores worse than with dropout off: that part is dropout's."""
    with_dropout = mode_metrics(result.outcomes, WITH_DROPOUT)
    train = mode_metrics(result.outcomes, TRAIN_ON_DROPOUT_BATCHES)
    if with_dropout is None or train is None or with_dropout.loss is None or train.loss is None:
        return ()
    if with_dropout.loss <= train.loss * 1.05:
        return ()
    return (f"model.train() loss {with_dropout.loss:.4g} vs {train.loss:.4g} with dropout off (on the same "
            f"{with_dropout.num_samples} samples): dropout accounts for that difference, not BatchNorm",)


@contextlib.contextmanager
def rank_zero_statistics(run: Run):
    """Across processes, diagnose the running statistics of rank 0 (the model a checkpoint saves):
    yields how far each layer's statistics differ between the ranks, in rank 0's standard deviations."""
    if run.world.size < 2:
        yield {}
        return
    mine = [(layer.running_mean(), layer.running_var()) for layer in run.layers]
    ranks = run.world.exchange(mine)
    spread = {layer.name: _spread(layer, [r[i] for r in ranks]) for i, layer in enumerate(run.layers)}
    spread = {name: value for name, value in spread.items() if value > 1e-6}
    snapshot = run.adapter.snapshot()
    try:
        for i, layer in enumerate(run.layers):
            mean, var = ranks[0][i]
            if layer.name in spread and mean is not None and var is not None:
                layer.write_running_stats(mean, var, var)
        yield spread
    finally:
        run.adapter.restore(snapshot)


def _spread(layer, values) -> float:
    import torch

    base_mean, base_var = values[0]
    if base_var is None:
        return 0.0
    std = torch.sqrt(base_var.clamp_min(0) + layer.eps)
    worst = 0.0
    for mean, var in values[1:]:
        shift = 0.0 if mean is None or base_mean is None else float(((mean - base_mean).abs() / std).max())
        ratio = float(((var + layer.eps) / (base_var + layer.eps)).log().abs().max())
        worst = max(worst, shift, ratio)
    return worst
