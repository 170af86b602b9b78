"""``bncheck.recalibrate``: exact running statistics from data (PreciseBN, done exactly).

Differences from ``torch.optim.swa_utils.update_bn`` and fvcore's PreciseBN:

* statistics are exact population moments over every sample, accumulated in
  float64 and weighted by sample count (``update_bn`` weights batches equally);
* only norm layers run in train mode, so Dropout stays off while statistics are
  collected (``update_bn`` calls ``model.train()``);
* the stored variance follows the layer's convention: PyTorch keeps the unbiased
  ``M2 / (n - 1)``, Keras the biased ``M2 / n``;
* layers whose parameters the user froze keep their statistics unless asked.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .batches import plan_batches
from .devices import resolve_device
from .diagnosis import require_running_stats
from .errors import InputError
from .frameworks import ForwardMode, adapter_for
from .tasks import mode_metrics
from .passes import ScoringOptions, run_passes
from .report import ModeMetrics


@dataclass(frozen=True)
class EvalComparison:
    data: str
    before: ModeMetrics
    after: ModeMetrics


@dataclass(frozen=True)
class RecalibrationResult:
    layers_updated: int
    updated_layers: tuple[str, ...]
    skipped_frozen: tuple[str, ...]
    num_samples: int
    num_batches: int
    evaluations: tuple[EvalComparison, ...]
    output_path: str | None = None


def recalibrate(
    model: Any,
    data: Any,
    *,
    inplace: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    num_samples: int | None = None,
    include_frozen: bool = False,
    val_data: Any = None,
    loss_fn: Callable | None = None,
    output_index: int | None = None,
    output_key: str | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    return_model: bool = False,
):
    """Recompute running statistics of every norm layer from ``data``.

    Returns a :class:`RecalibrationResult` (and the recalibrated model when
    ``return_model``). The caller's model is changed only with ``inplace=True``;
    otherwise a copy is recalibrated.
    """
    source = adapter_for(model)
    require_running_stats(source, source.norm_layers())
    target_model = model if inplace else source.clone_model()
    adapter = adapter_for(target_model)
    layers = [layer for layer in adapter.norm_layers() if layer.tracks_running_stats]
    skipped = tuple(l.name for l in layers if l.params_frozen and not include_frozen)
    chosen = [l for l in layers if l.name not in skipped]
    if not chosen:
        raise InputError(f"all {len(layers)} norm layers with running statistics have frozen parameters and are "
                         "kept as they are; pass --include-frozen (include_frozen=True) to recompute them")
    torch_device = resolve_device(device)
    scoring = ScoringOptions(loss_fn=loss_fn, output_index=output_index, output_key=output_key,
                             input_key=input_key, target_key=target_key)
    plan = plan_batches(data, batch_size=batch_size, seed=seed, max_batches=max_batches, max_samples=num_samples)
    plan.require_reiterable("recalibrate (statistics, then eval metrics before and after)")
    # Kept layers normalise with their running statistics, as they will in eval mode, so the
    # layers after them see the inputs they will see then.
    measured = run_passes(adapter, plan.batches, device=torch_device,
                          modes=(ForwardMode.EVAL, ForwardMode.NORM_TRAIN), scoring=scoring,
                          progress=progress, total_batches=plan.num_batches, keep_eval=frozenset(skipped))
    val_plan = plan_batches(val_data, batch_size=batch_size, seed=seed) if val_data is not None else None
    val_before = _evaluate(adapter, val_plan, torch_device, scoring) if val_plan else None
    before_writing = adapter.snapshot()
    try:  # all or nothing: a failure in the evaluations after writing puts the old statistics back
        _write_statistics(chosen, measured)
        after = _evaluate(adapter, plan, torch_device, scoring)
        evaluations = [EvalComparison("data", mode_metrics(measured.metrics[ForwardMode.EVAL]), after)]
        if val_plan is not None:
            evaluations.append(EvalComparison("val-data", val_before,
                                              _evaluate(adapter, val_plan, torch_device, scoring)))
    except BaseException:
        adapter.restore(before_writing)
        raise
    updated = tuple(l.name for l in chosen if l.name in measured.layer_stats)
    result = RecalibrationResult(len(updated), updated, skipped, measured.num_samples, measured.num_batches,
                                 tuple(evaluations))
    return (result, target_model) if return_model else result


def _write_statistics(layers, measured) -> None:
    for layer in layers:
        stats = measured.layer_stats.get(layer.name)
        if stats is not None:
            layer.write_running_stats(stats.mean, stats.var, stats.var_unbiased, num_batches=stats.num_batches)


def _evaluate(adapter, plan, device, scoring) -> ModeMetrics:
    outcome = run_passes(adapter, plan.batches, device=device, modes=(ForwardMode.EVAL,), collect_stats=False,
                         scoring=scoring)
    return mode_metrics(outcome.metrics[ForwardMode.EVAL])



def save_recalibrated(model: Any, path: Path, result: RecalibrationResult) -> RecalibrationResult:
    """Write the recalibrated model atomically: a state_dict, or a .keras file for Keras models."""
    from .files import write_atomically

    write_atomically(Path(path), adapter_for(model).save)
    return dataclasses.replace(result, output_path=str(path))
