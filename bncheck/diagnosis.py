"""``bncheck.diagnose``: measure the train/eval BatchNorm discrepancy of a model on data."""
from __future__ import annotations

from typing import Any, Callable

from .arguments import check_max_gap
from .batches import plan_batches
from .devices import resolve_device
from .errors import InputError, NoNormLayersError
from .findings import Evidence, find_causes
from .frameworks import ForwardMode, adapter_for
from .layer_report import drift_sort_key, forget_update_counts, measure_layer
from .passes import PassResult, ScoringOptions, run_passes
from .report import DataSummary, Gap, Gate, MetricsSet, Report, Verdict
from .tasks import Task, mode_metrics

DEFAULT_MAX_GAP = 0.05           # accuracy points (as a fraction) or train/eval prediction disagreement
DEFAULT_MAX_RELATIVE_LOSS_GAP = 0.10  # for tasks without accuracy: (eval loss - train loss) / train loss


def diagnose(
    model: Any,
    data: Any,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    max_samples: int | None = None,
    max_gap: float | None = None,
    loss_fn: Callable | None = None,
    output_index: int | None = None,
    output_key: str | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
    attribute: bool = False,
    attribute_top: int = 3,
    attribute_batches: int = 8,
    missing_running_stats: tuple[str, ...] = (),
    missing_update_counts: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    progress: Callable[[int, int | None], None] | None = None,
) -> Report:
    """Compare eval-mode and train-mode BatchNorm on ``data`` and explain any gap.

    The model is never modified: every buffer, momentum and mode flag is restored.
    ``max_gap`` is the largest accuracy gap (train-mode minus eval-mode) that passes;
    for tasks without accuracy it is the relative loss gap (default 0.10).
    """
    check_max_gap(max_gap)
    for name, value in (("max_batches", max_batches), ("attribute_batches", attribute_batches),
                        ("attribute_top", attribute_top)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    adapter = adapter_for(model)
    layers = adapter.norm_layers()
    require_running_stats(adapter, layers)
    torch_device = resolve_device(device)
    plan = plan_batches(data, batch_size=batch_size, seed=seed, max_batches=max_batches, max_samples=max_samples)
    modes = (ForwardMode.EVAL, ForwardMode.NORM_TRAIN)
    if adapter.has_dropout():
        modes += (ForwardMode.FULL_TRAIN,)
    scoring = ScoringOptions(loss_fn, output_index, output_key, input_key, target_key)
    initial_training = {layer.name: layer.is_training for layer in layers}
    result = run_passes(adapter, plan.batches, device=torch_device, modes=modes, scoring=scoring,
                        progress=progress, total_batches=plan.num_batches)
    forwards = result.num_batches
    layer_reports = sorted(forget_update_counts(
        (measure_layer(layer, result.layer_stats.get(layer.name), forwards=forwards,
                       dropout_stats=result.dropout_layer_stats.get(layer.name),
                       initial_training=initial_training[layer.name]) for layer in layers),
        missing_update_counts), key=drift_sort_key)
    metrics = _metrics_set(result)
    gap = _gap(metrics)
    gate = _gate(result, gap, max_gap)
    if result.nonfinite_eval_batches:
        # NaN or inf predictions fail whatever the metric says (argmax of NaN is no prediction).
        gate = Gate("nonfinite_eval_outputs", result.nonfinite_eval_batches / max(result.num_batches, 1), 0.0, False)
    attribution = None
    if attribute:
        from .attribution import attribute_gap

        attribution, layer_reports = attribute_gap(
            adapter, plan, result, layer_reports, device=torch_device, scoring=scoring,
            top=attribute_top, num_batches=attribute_batches)
    evidence = Evidence(
        layers=tuple(layer_reports), metrics=metrics, gate=gate, reshuffled=plan.reshuffled,
        mean_majority_share=result.mean_majority_share, num_classes_seen=result.num_classes_seen,
        attribution=attribution, missing_running_stats=missing_running_stats, framework=adapter.framework)
    return Report(
        verdict=Verdict.PASS if gate.passed else Verdict.FAIL,
        task=result.task.value,
        framework=adapter.framework,
        device=str(adapter.device_used(torch_device)),
        metrics=metrics,
        gap=gap,
        gate=gate,
        agreement=result.agreement,
        output_divergence=result.output_divergence,
        layers=tuple(layer_reports),
        findings=find_causes(evidence),
        data=DataSummary(result.num_samples, result.num_batches,
                         None if plan.batch_size is None else min(plan.batch_size, result.num_samples),
                         plan.reshuffled, seed,
                         result.mean_majority_share, result.num_classes_seen),
        attribution=attribution,
        notes=tuple(notes) + _dropout_note(metrics) + _nonfinite_note(result),
    )


def _nonfinite_note(result: PassResult) -> tuple[str, ...]:
    if not result.nonfinite_eval_batches:
        return ()
    return (f"eval-mode outputs held NaN or inf in {result.nonfinite_eval_batches} of {result.num_batches} "
            "batches (train-mode outputs were finite)",)


def _dropout_note(metrics: MetricsSet) -> tuple[str, ...]:
    """Say so when model.train() scores worse than train-mode BN alone: that part is dropout's."""
    with_dropout, train = metrics.train_with_dropout, metrics.train
    if with_dropout is None or with_dropout.loss is None or train.loss is None:
        return ()
    if with_dropout.loss <= train.loss * 1.05:
        return ()
    return (f"model.train() loss {with_dropout.loss:.4g} vs {train.loss:.4g} with dropout off: dropout accounts "
            "for that difference, not BatchNorm",)


def require_running_stats(adapter, layers) -> None:
    uninitialized = getattr(adapter, "uninitialized_layers", lambda: [])()
    if uninitialized:
        raise InputError(f"lazy norm layer {uninitialized[0]} is not initialised yet; "
                         "run one forward pass or load a checkpoint before diagnosing")
    if not layers:
        raise NoNormLayersError("the model has no BatchNorm/InstanceNorm layers with running statistics: "
                                "nothing for bncheck to check")
    if not any(layer.tracks_running_stats for layer in layers):
        raise NoNormLayersError(
            f"none of the model's {len(layers)} norm layers keeps running statistics "
            "(track_running_stats=False): eval mode already uses batch statistics, so there is nothing to compare")


def _metrics_set(result: PassResult) -> MetricsSet:
    return MetricsSet(
        eval=mode_metrics(result.metrics[ForwardMode.EVAL]),
        train=mode_metrics(result.metrics[ForwardMode.NORM_TRAIN]),
        train_with_dropout=mode_metrics(result.metrics.get(ForwardMode.FULL_TRAIN)),
    )


def _gap(metrics: MetricsSet) -> Gap:
    ev, tr = metrics.eval, metrics.train
    accuracy = tr.accuracy - ev.accuracy if tr.accuracy is not None and ev.accuracy is not None else None
    loss = ev.loss - tr.loss if ev.loss is not None and tr.loss is not None else None
    relative = loss / max(abs(tr.loss), 1e-12) if loss is not None else None
    return Gap(accuracy, loss, relative)


def _gate(result: PassResult, gap: Gap, max_gap: float | None) -> Gate:
    if result.task is Task.LABEL_FREE:
        threshold = DEFAULT_MAX_GAP if max_gap is None else max_gap
        value = 1.0 - (result.agreement if result.agreement is not None else 1.0)
        return Gate("disagreement", value, threshold, value <= threshold)
    if gap.accuracy is not None:
        threshold = DEFAULT_MAX_GAP if max_gap is None else max_gap
        return Gate("accuracy", gap.accuracy, threshold, gap.accuracy <= threshold)
    threshold = DEFAULT_MAX_RELATIVE_LOSS_GAP if max_gap is None else max_gap
    value = gap.relative_loss if gap.relative_loss is not None else 0.0
    return Gate("relative_loss", value, threshold, value <= threshold)
