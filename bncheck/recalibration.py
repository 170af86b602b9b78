"""``bncheck.recalibrate``: exact running statistics from data (PreciseBN, done exactly).

Differences from ``torch.optim.swa_utils.update_bn`` and fvcore's PreciseBN:

* statistics are exact population moments over every sample, accumulated in
  float64 and weighted by sample count (``update_bn`` weights batches equally);
* the statistics pass is the model's own training mode with dropout off
  (``update_bn`` calls ``model.train()`` and leaves dropout on);
* by default exactly the norm layers that normalise with batch statistics under
  ``model.train()`` are recomputed: layers an overridden ``train()`` keeps in eval, and
  FrozenBatchNorm, keep the statistics training used (``update_bn`` resets every
  BatchNorm, and leaves those at 0/1);
* the stored variance follows the layer's convention: PyTorch keeps the unbiased
  ``M2 / (n - 1)``, Keras the biased ``M2 / n``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .distributed import World, current_world
from .engine import PassSpec, run_pass
from .errors import InputError
from .frameworks import ForwardMode, NormLayer, adapter_for
from .outcomes import EVAL, mode_metrics
from .report import ModeMetrics
from .run import Run, RunOptions, require_running_stats, resolve_run

KEPT_EVAL_IN_TRAIN = "normalises with its running statistics under model.train(), so training used them"
KEPT_NOT_SELECTED = "not matched by --layers"


@dataclass(frozen=True)
class EvalComparison:
    data: str
    before: ModeMetrics
    after: ModeMetrics


@dataclass(frozen=True)
class KeptLayer:
    name: str
    reason: str


@dataclass(frozen=True)
class RecalibrationResult:
    layers_updated: int
    updated_layers: tuple[str, ...]
    kept_layers: tuple[KeptLayer, ...]
    num_samples: int
    num_batches: int
    evaluations: tuple[EvalComparison, ...]
    output_path: str | None = None


def recalibrate(model: Any, data: Any, *, inplace: bool = False, include_frozen: bool = False,
                layers: str | None = None, val_data: Any = None, evaluate: bool = True,
                num_samples: int | None = None, progress: Callable[[int, int | None], None] | None = None,
                return_model: bool = False, world: World | None = None, **run_options: Any):
    """Recompute the running statistics of the norm layers that normalise with batch statistics
    under ``model.train()``, from ``data``.

    ``include_frozen`` also recomputes the layers kept in eval in training (and FrozenBatchNorm);
    ``layers`` (comma-separated glob patterns of layer names) recomputes exactly the matching ones.
    ``evaluate`` adds eval metrics before and after (on ``data``, and on ``val_data`` when given).
    Returns a :class:`RecalibrationResult` (and the recalibrated model when ``return_model``). The
    caller's model is changed only with ``inplace=True``, and then entirely or not at all;
    otherwise a copy is recalibrated.
    """
    if num_samples is not None:
        run_options["max_samples"] = num_samples
    options = RunOptions.from_keywords(run_options)
    world = world or (current_world(options.dist_timeout) if options.distributed else World())
    with world.failing_together():
        source = adapter_for(model)
        require_running_stats(source, source.norm_layers())
        target = model if inplace else source.clone_model()
        run = resolve_run(source if inplace else target, data, options, world=world)
        chosen, kept = choose_layers(run.layers, include_frozen=include_frozen, patterns=layers)
        if evaluate:
            run.plan.require_reiterable("recalibrate (statistics, then eval metrics before and after)")
        snapshot = run.adapter.snapshot()
        try:
            result = _recalibrate(run, chosen, kept, val_data, evaluate, progress)
        except BaseException:
            run.adapter.restore(snapshot)  # all or nothing for the caller's model
            raise
    return (result, target) if return_model else result


def choose_layers(layers, *, include_frozen: bool = False, patterns: str | None = None):
    """The layers to recompute, and the ones kept with why."""
    tracked = [layer for layer in layers if layer.tracks_running_stats]
    if patterns is not None:
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        chosen = [layer for layer in tracked if any(fnmatch.fnmatchcase(layer.name, p) for p in wanted)]
        if not chosen:
            raise InputError(f"--layers {patterns!r} matches none of the {len(tracked)} norm layers "
                             f"(e.g. {', '.join(layer.name for layer in tracked[:3])})")
        reason = {layer.name: KEPT_NOT_SELECTED for layer in tracked}
    else:
        chosen = [layer for layer in tracked if layer.batch_stats_in_train or include_frozen]
        reason = {layer.name: KEPT_EVAL_IN_TRAIN for layer in tracked}
        if not chosen:
            raise InputError(f"none of the {len(tracked)} norm layers normalises with batch statistics under "
                             "model.train(), so training used their running statistics as they are; pass "
                             "--include-frozen (include_frozen=True) or --layers to recompute them anyway")
    names = {layer.name for layer in chosen}
    kept = tuple(KeptLayer(layer.name, reason[layer.name]) for layer in tracked if layer.name not in names)
    return chosen, kept


def _recalibrate(run: Run, chosen: list[NormLayer], kept, val_data, evaluate: bool, progress) -> RecalibrationResult:
    names = frozenset(layer.name for layer in chosen)
    modes = (ForwardMode.EVAL, ForwardMode.NORM_TRAIN) if evaluate else (ForwardMode.NORM_TRAIN,)
    # Kept layers normalise with their running statistics, as they will in eval mode, so the
    # layers after them see the inputs they will see then.
    val_run = dataclasses.replace(run, plan=_val_plan(run, val_data)) if evaluate and val_data is not None else None
    measured = run_pass(run, PassSpec(modes, batch_stats=names, scored=(ForwardMode.EVAL,)), progress)
    val_before = _evaluate(val_run) if val_run else None
    for layer in chosen:
        stats = measured.layer_stats.get(layer.name)
        if stats is not None:
            layer.write_running_stats(stats.mean, stats.var, stats.var_unbiased, num_batches=stats.num_batches)
    evaluations = []
    if evaluate:
        evaluations.append(EvalComparison("data", mode_metrics(measured.outcomes, EVAL), _evaluate(run)))
    if val_run is not None:
        evaluations.append(EvalComparison("val-data", val_before, _evaluate(val_run)))
    updated = tuple(layer.name for layer in chosen if layer.name in measured.layer_stats)
    return RecalibrationResult(len(updated), updated, kept, measured.num_samples, measured.num_batches,
                               tuple(evaluations))


def _val_plan(run: Run, val_data):
    """The val data's own batches (a DataLoader's, a list's); a bare dataset gets the plan's batch size.
    It is evaluated before and after, so it must be iterable twice."""
    from torch.utils.data import DataLoader

    from .batches import as_dataset, is_map_style, plan_batches

    plan = run.plan
    bare_dataset = not isinstance(val_data, DataLoader) and is_map_style(as_dataset(val_data))
    val_plan = plan_batches(val_data, batch_size=plan.batch_size if bare_dataset and plan.reshuffled else None,
                            seed=plan.seed, pin_memory=run.device.type == "cuda")
    val_plan.require_reiterable("recalibrate's --val-data evaluation (before and after)")
    return val_plan


def _evaluate(run: Run) -> ModeMetrics:
    outcome = run_pass(run, PassSpec(modes=(ForwardMode.EVAL,), collect_stats=False))
    return mode_metrics(outcome.outcomes, EVAL)


def save_recalibrated(model: Any, path: Path, result: RecalibrationResult) -> RecalibrationResult:
    """Write the recalibrated model atomically: a state_dict, or a .keras file for Keras models."""
    from .files import write_atomically

    write_atomically(Path(path), adapter_for(model).save)
    return dataclasses.replace(result, output_path=str(path))
