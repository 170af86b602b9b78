"""Root-cause rules: from measured layers and metrics to named findings.

Every rule is a pure function of the report's numbers. Thresholds are module
constants, documented in the README's findings table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .convergence import (
    counter_blend_ratio,
    cumulative_average_error,
    variance_below_counter_floor,
    weight_left_at_init,
)
from .report import AttributionSummary, Finding, Gate, LayerReport, MetricsSet, Severity

DRIFT_HIGH = 0.5             # mean 2-Wasserstein drift (in true std units) that counts as wrong statistics
DRIFT_NOTICEABLE = 0.25      # drift that explains a failed gate when the stats are at their 0/1 init
INITIAL_WEIGHT_HIGH = 0.05   # EMA weight still on the 0/1 initial values
KERAS_WEIGHT_AT_INIT_HIGH = 0.75  # Keras (no counter): moving stats covered under 1/4 of the way from 0/1 to the data
FEW_CUMULATIVE_UPDATES = 10  # momentum=None layers averaged over fewer batches than this
MOMENTUM_PORTED = 0.5        # PyTorch momentum above this is almost always a Keras value
MOMENTUM_HIGH = 0.2          # with noisy batch means, running stats follow the last batches
BATCH_SPREAD_HIGH = 0.5      # std of batch means over true std
SMALL_BATCH_SAMPLES = 16     # samples per channel in one batch
LABEL_SORTED_SHARE = 0.9     # mean share of a batch's majority class
DROPOUT_VAR_SHIFT = 0.1      # |variance ratio with dropout on vs off - 1|
ALL_FIXED_RECOVERS = 0.5     # share of the gap exact statistics must close to blame the running stats
COUNTER_BLEND_EXPLAINS = 0.5  # the counter's 0/1 blend must sit this much closer to the running stats than the data
VARIANCE_FLOOR_SLACK = 0.95  # n EMA updates from 1 leave running_var >= (1 - m)^n; below 95% of that, the counter lies
FIRST_LAYER_FOCUS = 3        # the first layer's drift must be this many times any later layer's
EVAL_BATCH_DEPENDENCE_HIGH = 1e-3  # relative change of an eval output when the rest of its batch changes
FEWEST_SAMPLES_SHOWN = 3     # layers named as the ones with the fewest samples per channel


@dataclass(frozen=True)
class Evidence:
    """Everything the rules read."""

    layers: tuple[LayerReport, ...]
    metrics: MetricsSet | None = None
    gate: Gate | None = None
    reshuffled: bool = True
    mean_majority_share: float | None = None
    num_classes_seen: int | None = None
    attribution: AttributionSummary | None = None
    missing_running_stats: tuple[str, ...] = ()
    framework: str = "torch"
    rank_spread: dict[str, float] = field(default_factory=dict)  # per layer, across processes
    registration_order: tuple[str, ...] = ()   # norm layer names as the model registers them
    averaging_hints: tuple[str, ...] = ()      # why the weights look averaged (SWA, EMA), from model or checkpoint
    eval_batch_dependence: float | None = None  # relative change of eval outputs when the rest of the batch changes

    @property
    def has_data(self) -> bool:
        return self.metrics is not None

    @property
    def gap_failed(self) -> bool:
        return self.gate is not None and not self.gate.passed


def _drifted(layer: LayerReport) -> bool:
    return layer.drift is not None and layer.drift > DRIFT_HIGH


def _names(layers) -> tuple[str, ...]:
    return tuple(layer.name for layer in layers)


def _worst(layers) -> dict:
    worst = max(layers, key=lambda l: l.drift or 0.0)
    return {"worst_layer": worst.name, "worst_drift": _round(worst.drift)}


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def _keras(ev: Evidence) -> bool:
    return ev.framework == "keras"


def _momentum_text(layer: LayerReport) -> str:
    return f"momentum={layer.momentum}" if layer.momentum is not None else "momentum=None"


def corrupt(ev: Evidence) -> list[Finding]:
    layers = [l for l in ev.layers if l.running_stats_corrupt]
    if not layers:
        return []
    return [Finding("stats-corrupt", Severity.ERROR, _names(layers), {"layers": len(layers)},
                    f"{len(layers)} norm layers hold NaN or inf running statistics or a negative variance "
                    "(an overflow in training, often in float16, or a damaged checkpoint): eval mode cannot "
                    "normalise with them.",
                    "Recompute the statistics from data: `bncheck recalibrate MODEL -o fixed.pt`; if training "
                    "produced them, look for overflow (loss scaling, learning rate).")]


def _judged(layer: LayerReport) -> bool:
    """Whether the layer's statistics can make eval differ from training: it keeps running statistics and
    normalises with batch statistics under model.train(). Layers kept in eval there used the same
    statistics in training: their drift is reported but is no finding by itself."""
    return layer.tracks_running_stats and layer.batch_stats_in_train


def _momentum_zero(layer: LayerReport) -> bool:
    """momentum=0 with counted updates: the statistics never moved (momentum=None was probably meant)."""
    return layer.framework == "torch" and layer.update_weight == 0 and (layer.num_batches_tracked or 0) > 0


def never_updated(ev: Evidence) -> list[Finding]:
    candidates = [l for l in ev.layers if l.tracks_running_stats and (
        l.name in ev.missing_running_stats or (l.running_stats_at_init and l.batch_stats_in_train))]
    if ev.has_data:
        # Init-valued stats are harmless only on data that happens to be ~N(0, 1); a failed gate says it is not.
        candidates = [l for l in candidates if _drifted(l) or l.name in ev.missing_running_stats
                      or (ev.gap_failed and (l.drift or 0.0) > DRIFT_NOTICEABLE)]
    if not candidates:
        return []
    tracked = [l for l in ev.layers if l.tracks_running_stats]
    evidence = {"layers_at_init": len(candidates), "layers_with_running_stats": len(tracked),
                "num_batches_tracked": sorted({l.num_batches_tracked for l in candidates if l.num_batches_tracked is not None})}
    if ev.missing_running_stats:
        evidence["missing_in_checkpoint"] = list(ev.missing_running_stats[:10])
    if ev.has_data:
        evidence.update(_worst(candidates))
    message = (f"{len(candidates)} of {len(tracked)} norm layers hold running statistics that were never "
               "updated (mean 0, variance 1) or were not saved/loaded with the checkpoint, so eval mode "
               "normalises with the wrong numbers.")
    fix = ("Save and load the moving statistics with the weights: `model.save('model.keras')` or "
           "`model.save_weights(...)` keeps non-trainable variables; or run `bncheck recalibrate`."
           if _keras(ev) else
           "Save and load buffers with the weights: `torch.save(model.state_dict(), path)` and "
           "`model.load_state_dict(torch.load(path))` (not `named_parameters()`); or run "
           "`bncheck recalibrate MODEL -o fixed.pt` to recompute them from data.")
    stuck = [l for l in candidates if _momentum_zero(l) and l.running_stats_at_init]
    if stuck:
        evidence["momentum_zero_layers"] = len(stuck)
        message += (f" {len(stuck)} of them have momentum=0: their statistics never moved from the reset values "
                    f"although num_batches_tracked counts {max(l.num_batches_tracked for l in stuck)} batches; "
                    "momentum=None (a cumulative average) was probably meant.")
        fix = ("Construct the layers with momentum=None for a cumulative average over all batches (or the default "
               "0.1), not momentum=0, then recompute the statistics: `bncheck recalibrate MODEL -o fixed.pt`.")
    severity = Severity.ERROR if ev.has_data or len(candidates) == len(tracked) else Severity.WARNING
    return [Finding("stats-never-updated", severity, _names(candidates), evidence, message, fix)]


def counter_lost(ev: Evidence) -> list[Finding]:
    """num_batches_tracked == 0 beside trained-looking statistics: the counter was lost, not the statistics."""
    if _keras(ev):
        return []  # Keras keeps no per-layer counter
    lost = [l for l in ev.layers if l.tracks_running_stats and not l.per_instance and l.num_batches_tracked == 0
            and not l.running_stats_at_init and not l.running_stats_corrupt and l.name not in ev.missing_running_stats]
    if not lost:
        return []
    cumulative = [l for l in lost if l.update_weight is None]
    message = (f"num_batches_tracked is 0 in {len(lost)} norm layers whose running statistics hold trained values: "
               "the counter was lost (a checkpoint saved without it, or a reset counter), not the statistics; "
               "eval mode is not affected by it.")
    if cumulative:
        message += (f" {len(cumulative)} of them use momentum=None, whose cumulative average restarts at 0: "
                    "the next training batch would replace their statistics.")
    return [Finding("update-counter-lost", Severity.INFO, _names(lost),
                    {"layers": len(lost), "momentum_none_layers": len(cumulative)}, message,
                    "Nothing to do for eval mode. To keep training momentum=None layers, recompute the statistics "
                    "first (`bncheck recalibrate MODEL -o fixed.pt` also counts the batches it averaged).")]


def _unconverged_by_values(l: LayerReport) -> bool:
    """With data: the running statistics measured against the data's (see convergence.py)."""
    if l.framework == "keras":
        measured = weight_left_at_init(l)
        return measured is not None and measured > KERAS_WEIGHT_AT_INIT_HIGH
    if l.update_weight is None:
        # A cumulative average gives 0/1 no weight; averaged over few batches it is merely noisy.
        error = cumulative_average_error(l)
        return bool(l.num_batches_tracked) and l.num_batches_tracked < FEW_CUMULATIVE_UPDATES \
            and error is not None and error >= DRIFT_HIGH / 2
    ratio = counter_blend_ratio(l)
    return (l.initial_weight or 0.0) > INITIAL_WEIGHT_HIGH and ratio is not None and ratio < COUNTER_BLEND_EXPLAINS


def _unconverged_by_counter(l: LayerReport, contradicted: set) -> bool:
    """Without data: the counter (Keras: the optimizer's steps), unless the values contradict it."""
    if not l.num_batches_tracked:
        return False
    if l.framework == "keras":
        return (l.initial_weight or 0.0) > INITIAL_WEIGHT_HIGH
    if l.update_weight is None:
        return l.num_batches_tracked < FEW_CUMULATIVE_UPDATES
    return (l.initial_weight or 0.0) > INITIAL_WEIGHT_HIGH and _counter(l) not in contradicted


def _counter(l: LayerReport) -> tuple:
    return l.update_weight, l.num_batches_tracked


def _contradicted_counters(ev: Evidence) -> set:
    """Counters some layer's values contradict. Layers with the same momentum and count were updated
    together: when one of them cannot hold n updates from 0/1, the statistics were recomputed for all."""
    return {_counter(l) for l in ev.layers if l.framework == "torch" and l.tracks_running_stats
            and variance_below_counter_floor(l, VARIANCE_FLOOR_SLACK)}


def not_converged(ev: Evidence, exclude: set[str]) -> list[Finding]:
    contradicted = set() if ev.has_data else _contradicted_counters(ev)

    def unconverged(l: LayerReport) -> bool:
        if not _judged(l) or l.name in exclude or l.update_weight == 0:
            return False  # momentum 0 (Keras: 1) freezes the statistics on purpose: not a convergence problem
        if ev.has_data:
            return _drifted(l) and _unconverged_by_values(l)
        return _unconverged_by_counter(l, contradicted)

    candidates = [l for l in ev.layers if unconverged(l)]
    if not candidates:
        return []
    sample = candidates[0]
    measured = weight_left_at_init(sample) if ev.has_data else None
    evidence = {"num_batches_tracked": sample.num_batches_tracked, "momentum": sample.momentum,
                "initial_weight": _round(sample.initial_weight if measured is None else measured),
                "judged_by": "values" if ev.has_data else "counter"}
    if ev.has_data:
        evidence["counter_initial_weight"] = _round(sample.initial_weight)
        evidence.update(_worst(candidates))
    text, fix = (_keras_not_converged_text if _keras(ev) else _torch_not_converged_text)(sample, measured)
    severity = Severity.ERROR if ev.has_data else Severity.WARNING if _keras(ev) else Severity.INFO
    return [Finding("stats-not-converged", severity, _names(candidates), evidence, text, fix)]


def _keras_not_converged_text(sample: LayerReport, measured: float | None) -> tuple[str, str]:
    fix = ("Use a lower momentum such as `BatchNormalization(momentum=0.9)`, train for more steps, "
           "or run `bncheck recalibrate model.keras -o fixed.keras`.")
    steps = sample.num_batches_tracked
    if measured is not None:
        return (f"The moving averages are still about {measured:.0%} at their initial 0/1 values (momentum "
                f"{sample.momentum}, Keras convention; measured against the data's statistics"
                + (f", after {steps} optimizer steps" if steps else "") + "), far from the data's statistics."), fix
    return (f"The moving averages saw only {steps} optimizer steps with momentum {sample.momentum} (Keras "
            f"convention): {sample.initial_weight:.0%} of their weight is still on the values they held before (0/1 "
            "for a new layer, the pretrained statistics when fine-tuning)."), fix


def _torch_not_converged_text(sample: LayerReport, measured: float | None) -> tuple[str, str]:
    n, weight = sample.num_batches_tracked, sample.initial_weight
    if sample.update_weight is None:
        error = cumulative_average_error(sample)
        text = f"The momentum=None layers averaged only {n} batches"
        text += (f": an average of so few batches misses the data's mean by about {error:.2g} σ." if error is not None
                 else " (a cumulative average); by the update counter alone, `bncheck diagnose` measures them.")
        return text, ("Average over more batches: `bncheck recalibrate MODEL -o fixed.pt` (every sample), "
                      "or torch.optim.swa_utils.update_bn over a whole epoch.")
    if sample.momentum is not None and sample.momentum < 0.1:
        fix = ("Use the default momentum: `nn.BatchNorm2d(C, momentum=0.1)` (PyTorch 0.01 equals Keras 0.99), "
               "train for more steps, or recompute exact statistics: `bncheck recalibrate MODEL -o fixed.pt`.")
    else:  # the momentum is fine: training has simply not run long enough yet
        fix = (f"Train for more steps (with momentum {sample.momentum} the initial values weigh under 1% after 50 "
               "updates), or recompute exact statistics now: `bncheck recalibrate MODEL -o fixed.pt`.")
    if measured is not None:
        return (f"The running statistics are still about {measured:.0%} at their initial 0/1 values, measured "
                f"against the data's statistics: {n} updates with momentum {sample.momentum} leave "
                f"{weight:.0%} of the weight on the initial values, and that blend explains the drift."), fix
    return (f"By the update counter alone (no data to check the values): {n} updates with momentum "
            f"{sample.momentum} would leave {weight:.0%} of the weight on the initial 0/1 values if these "
            "statistics came from training's moving average. Statistics recomputed by update_bn or "
            "`bncheck recalibrate` carry small counters too; `bncheck diagnose` judges them from data."), fix


def dominated_by_recent(ev: Evidence) -> list[Finding]:
    ported = [l for l in ev.layers if _judged(l) and l.update_weight is not None
              and l.update_weight > MOMENTUM_PORTED]
    noisy = [l for l in ev.layers if _judged(l) and l.update_weight is not None
             and MOMENTUM_HIGH <= l.update_weight <= MOMENTUM_PORTED and _drifted(l)
             and (l.batch_mean_spread or 0.0) > BATCH_SPREAD_HIGH]
    candidates = ported + noisy
    if not candidates:
        return []
    drifted = [l for l in candidates if _drifted(l)]
    severity = Severity.ERROR if drifted and ev.gap_failed else Severity.WARNING
    if ev.has_data and not drifted:
        severity = Severity.INFO
    weight = candidates[0].update_weight
    evidence = {"update_weight": weight, "effective_batches": _round(1.0 / weight, 2) if weight else None}
    if ev.has_data:
        evidence.update(_worst(candidates))
        evidence["batch_mean_spread"] = _round(max((l.batch_mean_spread or 0.0) for l in candidates))
    if _keras(ev):
        fix = ("Keras momentum is the weight on the old value: use `BatchNormalization(momentum=0.99)`, "
               "then `bncheck recalibrate` to recompute the statistics over the whole data.")
    else:
        fix = ("PyTorch momentum is the weight on the new batch: use `nn.BatchNorm2d(C, momentum=0.1)` "
               "(a Keras momentum of 0.9/0.99 is PyTorch 0.1/0.01), then `bncheck recalibrate MODEL -o fixed.pt`.")
    return [Finding("stats-dominated-by-recent-batches", severity, _names(candidates), evidence,
                    f"Each batch moves the running statistics by {weight:.0%}, so they reflect the last "
                    f"~{max(1, round(1 / weight))} batches of training rather than the data as a whole.", fix)]


def frozen_in_train_mode(ev: Evidence) -> list[Finding]:
    candidates = [l for l in ev.layers if _judged(l) and l.params_frozen]
    if ev.has_data:
        candidates = [l for l in candidates if _drifted(l)]
    if not candidates:
        return []
    evidence = {"frozen_layers_in_train_mode": len(candidates)}
    if ev.has_data:
        evidence.update(_worst(candidates))
    fix = ("Keras 3 runs `trainable=False` BatchNormalization in inference mode; call the frozen base as "
           "`base_model(x, training=False)`, then `bncheck recalibrate --include-frozen` if its statistics are stale."
           if _keras(ev) else
           "Keep frozen norm layers in eval mode after every `model.train()`: "
           "`for m in backbone.modules(): m.eval() if isinstance(m, nn.modules.batchnorm._BatchNorm) else None`; "
           "or recompute their statistics on the new data: `bncheck recalibrate MODEL -o fixed.pt` (by default it "
           "recomputes every norm layer that trains under `model.train()`, these included).")
    return [Finding("frozen-bn-in-train-mode", Severity.ERROR if ev.has_data else Severity.WARNING,
                    _names(candidates), evidence,
                    f"{len(candidates)} norm layers have frozen affine parameters but run in train mode: "
                    "training normalises with batch statistics while eval uses running statistics of other data.",
                    fix)]


def forward_order(ev: Evidence) -> list[LayerReport]:
    """The measured layers in forward order: ``LayerReport.order`` where the engine recorded it, else the
    order in which the model registers its modules (a stem comes first in both); empty when neither is known."""
    measured = [l for l in ev.layers if l.drift is not None]
    if any(l.order is not None for l in measured):
        return sorted((l for l in measured if l.order is not None), key=lambda l: l.order)
    position = {name: index for index, name in enumerate(ev.registration_order)}
    return sorted((l for l in measured if l.name in position), key=lambda l: position[l.name])


def _std_ratio_furthest_from_one(layer: LayerReport) -> float | None:
    """Running std over the data's std in the channel where it is furthest from 1 (either way)."""
    ratios = [r for r in (layer.var_ratio_min, layer.var_ratio_max) if r is not None and r > 0]
    if not ratios:
        return None
    return math.sqrt(max(ratios, key=lambda r: abs(math.log(r))))


def _scale_hint(std_ratio: float | None) -> str:
    if std_ratio is not None and 1 / 400 < std_ratio < 1 / 100:
        return " The data's spread is about 255 times training's: pixels in 0–255 where training used 0–1."
    if std_ratio is not None and 100 < std_ratio < 400:
        return " Training's spread is about 255 times the data's: pixels in 0–1 where training used 0–255."
    return ""


def preprocessing_shift(ev: Evidence, exclude: set[str]) -> list[Finding]:
    """Drift in the first norm layer alone: in train mode it absorbs any per-channel change of the input,
    so the layers after it see what they saw in training; the input itself changed."""
    if not ev.has_data:
        return []
    ordered = [l for l in forward_order(ev) if l.tracks_running_stats]
    if len(ordered) < 2:
        return []
    first, later = ordered[0], [l for l in ordered[1:] if _judged(l)]
    if first.name in exclude or not _drifted(first) or not later:
        return []
    later_drift = max(l.drift for l in later)
    if later_drift >= DRIFT_NOTICEABLE or first.drift < FIRST_LAYER_FOCUS * later_drift:
        return []
    std_ratio = _std_ratio_furthest_from_one(first)
    evidence = {"first_layer": first.name, "first_drift": _round(first.drift),
                "mean_shift_max": _round(first.mean_shift_max), "std_ratio": _round(std_ratio),
                "later_drift_max": _round(later_drift)}
    kept = "" if first.batch_stats_in_train else \
        " (it normalises with its running statistics under model.train() too, so training saw them as well)"
    message = (f"Only the first norm layer, {first.name}, is off: its running mean is {first.mean_shift_max:.3g} σ "
               f"from the data's in the worst channel and its running std {std_ratio:.3g} times the data's{kept}, "
               f"while every later layer fits (drift at most {later_drift:.2g}). The data is almost certainly "
               "preprocessed differently from training: Normalize(mean, std) missing or different, pixels in "
               "0–255 vs 0–1, RGB vs BGR channel order, or a different resize." + _scale_hint(std_ratio))
    fix = "Feed the data exactly as in training (the same Normalize mean/std, value range, channel order and resize). "
    if first.batch_stats_in_train:
        fix += "If this is the data the model will see, recompute the statistics on it: " + (
            "`bncheck recalibrate model.keras -o fixed.keras`." if _keras(ev) else "`bncheck recalibrate MODEL -o fixed.pt`.")
        severity = Severity.WARNING
    else:
        # Training used these statistics too: recomputing them alone would change what the later layers learned on.
        fix += ("If this is the data the model will see, the layers after it were trained on top of these "
                "statistics: recompute them with `bncheck recalibrate MODEL --include-frozen -o fixed.pt` only if "
                "you fine-tune again afterwards.")
        severity = Severity.INFO
    return [Finding("preprocessing-shift", Severity.ERROR if ev.gap_failed else severity, (first.name,),
                    evidence, message, fix)]


def averaged_weights(ev: Evidence, exclude: set[str]) -> list[Finding]:
    """Averaged weights (SWA, EMA) beside statistics that do not fit them: averaging copied or skipped the buffers."""
    if not ev.has_data or not ev.averaging_hints:
        return []
    candidates = [l for l in ev.layers if _judged(l) and _drifted(l) and l.name not in exclude]
    if not candidates:
        return []
    evidence = {"averaging": list(ev.averaging_hints), **_worst(candidates)}
    kept = [l.name for l in ev.layers if not _judged(l) and _drifted(l)]
    if kept:
        evidence["drifted_layers_kept_in_eval"] = kept[:10]
    message = (f"The weights are averaged ({'; '.join(ev.averaging_hints)}) and {len(candidates)} norm layers hold "
               "running statistics that do not fit them: weight averaging is the likely cause. "
               "torch.optim.swa_utils.AveragedModel and most EMA helpers average the parameters but not the "
               "running statistics, which still belong to other weights.")
    if kept:
        message += f" {len(kept)} drifted layers kept in eval by model.train() are listed for information."
    fix = ("Recompute the statistics for the averaged weights after averaging: "
           "torch.optim.swa_utils.update_bn(loader, swa_model) or `bncheck recalibrate MODEL -o fixed.pt`; "
           "for an EMA, average the buffers too (AveragedModel(..., use_buffers=True)).")
    return [Finding("averaged-weights-stale-stats", Severity.ERROR if ev.gap_failed else Severity.WARNING,
                    _names(candidates), evidence, message, fix)]


def mismatch(ev: Evidence, exclude: set[str]) -> list[Finding]:
    if not ev.has_data:
        return []
    candidates = [l for l in ev.layers if _judged(l) and _drifted(l) and l.name not in exclude]
    if not candidates or not (ev.gap_failed or _attribution_recovers(ev)):
        return []
    evidence = _worst(candidates)
    evidence["mean_shift_max"] = _round(max(l.mean_shift_max or 0.0 for l in candidates))
    evidence["var_ratio_max"] = _round(max(l.var_ratio_max or 0.0 for l in candidates))
    if ev.attribution is not None:
        evidence["gap_recovered_by_exact_stats"] = _round(ev.attribution.all_fixed.recovered_share)
    return [Finding("stats-mismatch", Severity.ERROR if ev.gap_failed else Severity.WARNING, _names(candidates),
                    evidence,
                    f"{len(candidates)} norm layers hold running statistics of different data (another domain, "
                    "preprocessing, or stale statistics after fine-tuning or weight averaging).",
                    "Recompute the statistics on data like this: `bncheck recalibrate MODEL -o fixed.keras`."
                    if _keras(ev) else
                    "Recompute the statistics on data like this: `bncheck recalibrate MODEL -o fixed.pt` "
                    "(or torch.optim.swa_utils.update_bn after weight averaging).")]


def _attribution_recovers(ev: Evidence) -> bool:
    share = ev.attribution.all_fixed.recovered_share if ev.attribution is not None else None
    return share is not None and share >= ALL_FIXED_RECOVERS


def small_batches(ev: Evidence) -> list[Finding]:
    if not ev.has_data:
        return []
    small = [l for l in ev.layers if l.batch_samples is not None and l.batch_samples < SMALL_BATCH_SAMPLES
             and not l.per_instance and l.batch_stats_in_train]
    if not small:
        return []
    share = ev.attribution.all_fixed.recovered_share if ev.attribution is not None else None
    persists = ev.gap_failed and share is not None and share < ALL_FIXED_RECOVERS
    evidence = {"samples_per_batch": min(l.batch_samples for l in small),
                "batch_mean_spread": _round(max((l.batch_mean_spread or 0.0) for l in small))}
    if share is not None:
        evidence["gap_recovered_by_exact_stats"] = _round(share)
    return [Finding("small-normalization-batch", Severity.ERROR if persists else Severity.INFO, _names(small),
                    evidence,
                    f"Batches give these layers only {int(evidence['samples_per_batch'])} samples per channel: "
                    "train-mode batch statistics are noisy, so train-mode numbers are optimistic or unstable.",
                    "Use larger batches (or gradient accumulation with a larger physical batch), or replace "
                    "BatchNorm with GroupNorm/LayerNorm where batches must stay small.")]


def label_sorted(ev: Evidence) -> list[Finding]:
    share = ev.mean_majority_share
    if ev.reshuffled or share is None or (ev.num_classes_seen or 0) < 2 or share < LABEL_SORTED_SHARE:
        return []
    return [Finding("label-sorted-batches", Severity.WARNING, (), {"mean_majority_share": _round(share),
                                                                  "num_classes": ev.num_classes_seen},
                    f"The data's batches are nearly single-class (majority class {share:.0%} of each batch on "
                    "average): batch statistics are unrepresentative in training and in this check.",
                    "Shuffle the data: `DataLoader(dataset, batch_size=..., shuffle=True)`, or return the Dataset "
                    "itself so bncheck draws shuffled batches.")]


def dropout_shift(ev: Evidence) -> list[Finding]:
    shifted = [l for l in ev.layers if l.dropout_var_ratio is not None
               and abs(l.dropout_var_ratio - 1.0) > DROPOUT_VAR_SHIFT]
    if not shifted:
        return []
    evidence = {"dropout_var_ratio_max": _round(max(l.dropout_var_ratio for l in shifted))}
    message = (f"Dropout runs before {len(shifted)} norm layers, so their input variance differs between "
               "training (dropout on) and inference (off).")
    if ev.metrics is not None and ev.metrics.train_with_dropout is not None:
        evidence["train_with_dropout_loss"] = _round(ev.metrics.train_with_dropout.loss)
        evidence["train_loss"] = _round(ev.metrics.train.loss)
        if not ev.gap_failed:
            message += " The norm layers themselves are consistent: dropout accounts for the difference in training loss."
    return [Finding("dropout-variance-shift", Severity.WARNING if ev.gap_failed else Severity.INFO,
                    _names(shifted), evidence, message,
                    "Place Dropout after the last norm layer (e.g. before the classifier), or recalibrate the "
                    "statistics with dropout off: `bncheck recalibrate`.")]


def batch_dependent(ev: Evidence) -> list[Finding]:
    layers = [l for l in ev.layers if not l.tracks_running_stats]
    if layers:
        return [Finding("batch-dependent-eval", Severity.WARNING, _names(layers), {"layers": len(layers)},
                        f"{len(layers)} norm layers keep no running statistics, so in eval mode they normalise each "
                        "batch by itself and a prediction depends on the other samples in its batch.",
                        "Construct them with `track_running_stats=True` (the default) and recalibrate, or use "
                        "GroupNorm/LayerNorm if batch independence is not needed at train time.")]
    change = ev.eval_batch_dependence
    if change is None or change <= EVAL_BATCH_DEPENDENCE_HIGH:
        return []
    return [Finding("batch-dependent-eval", Severity.WARNING, (), {"relative_output_change": _round(change, 6)},
                    "Eval-mode outputs depend on the batch outside the norm layers: the same samples give outputs "
                    f"that differ by up to {change:.2g} (relative) when the other samples in their batch change, "
                    "although every norm layer normalises with its running statistics. Something in forward uses batch "
                    "statistics in eval mode, such as x - x.mean(0), a batch-wide softmax or normalisation.",
                    "Make eval-mode forward treat each sample on its own (statistics over the sample's own "
                    "dimensions, or running statistics kept in a buffer), so that a prediction does not depend on "
                    "the batch it is in.")]


def reused(ev: Evidence) -> list[Finding]:
    layers = [l for l in ev.layers if l.calls_per_forward > 1.0]
    if not layers:
        return []
    return [Finding("norm-layer-reused", Severity.WARNING, _names(layers),
                    {"calls_per_forward": _round(max(l.calls_per_forward for l in layers), 2)},
                    f"{len(layers)} norm modules are called more than once per forward: their running statistics "
                    "mix inputs from different places in the network.",
                    "Give each call site its own norm layer (e.g. `self.bn1`, `self.bn2` instead of calling "
                    "`self.bn` twice).")]


def ranks_differ(ev: Evidence) -> list[Finding]:
    if not ev.rank_spread:
        return []
    names = tuple(sorted(ev.rank_spread, key=ev.rank_spread.get, reverse=True))
    worst = names[0]
    return [Finding("rank-stats-differ", Severity.WARNING, names,
                    {"layers": len(names), "worst_layer": worst, "worst_spread": _round(ev.rank_spread[worst])},
                    f"The processes hold different running statistics in {len(names)} norm layers (worst: {worst}, "
                    f"{ev.rank_spread[worst]:.3g} standard deviations apart): each process kept its own batches' "
                    "averages, and this diagnosis used rank 0's, which is what a checkpoint saved by rank 0 holds.",
                    "Synchronise the statistics: DistributedDataParallel(model, broadcast_buffers=True), or "
                    "nn.SyncBatchNorm.convert_sync_batchnorm(model), or recompute them before saving: "
                    "`torchrun --nproc-per-node=N -m bncheck recalibrate MODEL -o fixed.pt`.")]


def _gap_words(gate: Gate) -> str:
    if gate.metric == "accuracy":
        return f"{gate.value * 100:.1f} accuracy points"
    if gate.metric == "disagreement":
        return f"{gate.value:.0%} of their predictions"
    return f"a relative loss gap of {gate.value:.0%}"


# Findings that explain why statistics would drift, not a gap by themselves: with exact statistics,
# dropout before a norm layer changes nothing between eval mode and train mode with dropout off.
NOT_A_GAP_CAUSE = {"dropout-variance-shift"}


def gap_cause(ev: Evidence, findings: list[Finding]) -> list[Finding]:
    """The last rule: a failed gate that no other rule explained still gets a cause."""
    explaining = [f for f in findings if f.severity in (Severity.ERROR, Severity.WARNING)
                  and f.code not in NOT_A_GAP_CAUSE]
    if not ev.gap_failed or explaining:
        return []
    measured = [l for l in ev.layers if _judged(l) and l.drift is not None]
    worst = max(measured, key=lambda l: l.drift) if measured else None
    if worst is None or worst.drift < DRIFT_NOTICEABLE:
        return [_gap_from_train_mode(ev, worst)]
    above = [l for l in measured if l.drift >= DRIFT_NOTICEABLE]
    return [Finding("unexplained-gap", Severity.WARNING, _names(above), {**_worst(above), "noticeably_drifted_layers": len(above)},
                    f"Train mode and eval mode differ by {_gap_words(ev.gate)}, but no single cause stands out: "
                    f"the most drifted norm layer is {worst.name} (drift {worst.drift:.2g}; {len(above)} layers "
                    f"above {DRIFT_NOTICEABLE}), under the {DRIFT_HIGH} at which bncheck calls statistics wrong on "
                    "their own, and several such layers can add up.",
                    "Recompute exact statistics on this data (`bncheck recalibrate MODEL -o fixed.pt`) and diagnose "
                    "again: if the gap closes, the running statistics were the cause; if it stays, it comes from "
                    "train mode (small batches, or other code that depends on the batch). `--attribute` measures "
                    "each layer's share.")]


def _gap_from_train_mode(ev: Evidence, worst: LayerReport | None) -> Finding:
    sampled = sorted((l for l in ev.layers if l.batch_stats_in_train and l.batch_samples is not None
                      and not l.per_instance), key=lambda l: (l.batch_samples, l.name))[:FEWEST_SAMPLES_SHOWN]
    evidence = {"drift_max": _round(worst.drift if worst is not None else None),
                "fewest_samples_per_channel": {l.name: int(l.batch_samples) for l in sampled}}
    exact = (f"The running statistics fit this data (drift at most {worst.drift:.2g} in every norm layer)"
             if worst is not None else "No norm layer normalises with batch statistics under model.train()")
    fewest = ", ".join(f"{l.name}: {int(l.batch_samples)}" for l in sampled)
    return Finding("gap-from-train-mode", Severity.WARNING, _names(sampled), evidence,
                   f"{exact}, yet train mode and eval mode differ by {_gap_words(ev.gate)}: the gap comes from "
                   "train mode, not from eval mode. Batch statistics are noisy where a layer sees few samples per "
                   "channel" + (f" (fewest per batch: {fewest})" if fewest else "") +
                   ", or something else in the model depends on the batch or on model.train().",
                   "Evaluate at a realistic batch size and input size (--batch-size, the training resolution), "
                   "so that batch statistics are as precise as in training, or judge the model by eval mode: its "
                   "running statistics are exact for this data.")


def find_causes(ev: Evidence) -> tuple[Finding, ...]:
    findings = corrupt(ev)
    explained = {name for f in findings for name in f.layers}
    findings += [f for f in never_updated(ev) if not explained.issuperset(f.layers)]
    explained |= {name for f in findings for name in f.layers}
    findings += counter_lost(ev)
    unconverged = not_converged(ev, explained)
    frozen = frozen_in_train_mode(ev)
    recent = dominated_by_recent(ev)
    for group in (unconverged, frozen, recent):
        explained |= {name for f in group for name in f.layers}
    shifted = preprocessing_shift(ev, explained)
    explained |= {name for f in shifted for name in f.layers}
    averaged = averaged_weights(ev, explained)
    explained |= {name for f in averaged for name in f.layers}
    findings += unconverged + frozen + recent + shifted + averaged + mismatch(ev, explained)
    rules: list[Callable[[Evidence], list[Finding]]] = [small_batches, label_sorted, dropout_shift,
                                                        batch_dependent, reused, ranks_differ]
    for rule in rules:
        findings += rule(ev)
    findings += gap_cause(ev, findings)
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return tuple(sorted(findings, key=lambda f: order[f.severity]))
