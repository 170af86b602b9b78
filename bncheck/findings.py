"""Root-cause rules: from measured layers and metrics to named findings.

Every rule is a pure function of the report's numbers. Thresholds are module
constants, documented in the README's findings table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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


def never_updated(ev: Evidence) -> list[Finding]:
    candidates = [l for l in ev.layers if l.tracks_running_stats and (
        l.running_stats_at_init or l.num_batches_tracked == 0 or l.name in ev.missing_running_stats)]
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
    fix = ("Save and load the moving statistics with the weights: `model.save('model.keras')` or "
           "`model.save_weights(...)` keeps non-trainable variables; or run `bncheck recalibrate`."
           if _keras(ev) else
           "Save and load buffers with the weights: `torch.save(model.state_dict(), path)` and "
           "`model.load_state_dict(torch.load(path))` (not `named_parameters()`); or run "
           "`bncheck recalibrate MODEL -o fixed.pt` to recompute them from data.")
    severity = Severity.ERROR if ev.has_data or len(candidates) == len(tracked) else Severity.WARNING
    return [Finding("stats-never-updated", severity, _names(candidates), evidence,
                    f"{len(candidates)} of {len(tracked)} norm layers hold running statistics that were never "
                    "updated (mean 0, variance 1) or were not saved/loaded with the checkpoint, so eval mode "
                    "normalises with the wrong numbers.", fix)]


def _keras_weight_at_init(l: LayerReport) -> float | None:
    """Keras keeps no update counter, so with data measure it: the share of the way from the 0/1
    initial values to the data's statistics that the moving statistics have NOT covered (per channel
    as points (mean, std) in true-std units, summed). That is the EMA weight still on 0/1 when training
    saw statistics like the data's; statistics of other data (pretrained ones) cover the way or more."""
    c = l.channels
    if l.framework != "keras" or c is None:
        return None
    moved = total = 0.0
    for mean, var, run_mean, run_var in zip(c.true_mean, c.true_var, c.running_mean, c.running_var):
        std = math.sqrt(var + l.eps)
        init = (0.0, math.sqrt(1.0 + l.eps) / std)
        moved += math.dist((run_mean / std, math.sqrt(max(run_var, 0.0) + l.eps) / std), init)
        total += math.dist((mean / std, 1.0), init)
    return max(0.0, 1.0 - moved / total) if total > 0 else None


def not_converged(ev: Evidence, exclude: set[str]) -> list[Finding]:
    def unconverged(l: LayerReport) -> bool:
        if not l.tracks_running_stats or l.name in exclude or l.update_weight == 0:
            return False  # momentum 0 (Keras: 1) freezes the statistics on purpose: not a convergence problem
        measured = _keras_weight_at_init(l)
        if measured is not None:
            return measured > KERAS_WEIGHT_AT_INIT_HIGH
        if not l.num_batches_tracked:
            return False
        if l.update_weight is None:
            return l.num_batches_tracked < FEW_CUMULATIVE_UPDATES
        return (l.initial_weight or 0.0) > INITIAL_WEIGHT_HIGH

    candidates = [l for l in ev.layers if unconverged(l)]
    if ev.has_data:
        candidates = [l for l in candidates if _drifted(l)]
    if not candidates:
        return []
    sample = candidates[0]
    measured = _keras_weight_at_init(sample)
    weight = sample.initial_weight if measured is None else measured
    evidence = {"num_batches_tracked": sample.num_batches_tracked, "momentum": sample.momentum,
                "initial_weight": _round(weight)}
    if ev.has_data:
        evidence.update(_worst(candidates))
    if _keras(ev):
        fix = ("Use a lower momentum such as `BatchNormalization(momentum=0.9)`, train for more steps, "
               "or run `bncheck recalibrate model.keras -o fixed.keras`.")
        steps = sample.num_batches_tracked
        if measured is not None:
            text = (f"The moving averages are still about {measured:.0%} at their initial 0/1 values (momentum "
                    f"{sample.momentum}, Keras convention; measured against the data's statistics"
                    + (f", after {steps} optimizer steps" if steps else "") + "), far from the data's statistics.")
        else:
            text = (f"The moving averages saw only {steps} optimizer steps with momentum {sample.momentum} (Keras "
                    f"convention): {weight:.0%} of their weight is still on the values they held before (0/1 "
                    "for a new layer, the pretrained statistics when fine-tuning).")
    else:
        fix = ("Use the default momentum: `nn.BatchNorm2d(C, momentum=0.1)` (PyTorch 0.01 equals Keras 0.99), "
               "train for more steps, or recompute exact statistics: `bncheck recalibrate MODEL -o fixed.pt`.")
        weight_words = f"still {weight:.0%} on the initial 0/1 values" if weight is not None else "few updates"
        text = (f"The moving averages saw only {sample.num_batches_tracked} updates with momentum {sample.momentum}: "
                + (f"{weight_words}, far from the data's statistics." if ev.has_data else
                   f"by the update counter alone, {weight_words}; `bncheck diagnose` measures them against data."))
    return [Finding("stats-not-converged", Severity.ERROR if ev.has_data else Severity.WARNING, _names(candidates),
                    evidence, text, fix)]


def dominated_by_recent(ev: Evidence) -> list[Finding]:
    ported = [l for l in ev.layers if l.tracks_running_stats and l.update_weight is not None
              and l.update_weight > MOMENTUM_PORTED]
    noisy = [l for l in ev.layers if l.tracks_running_stats and l.update_weight is not None
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
    candidates = [l for l in ev.layers if l.tracks_running_stats and l.params_frozen and l.batch_stats_in_train]
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
           "or recompute their statistics on the new data with `bncheck recalibrate --include-frozen`.")
    return [Finding("frozen-bn-in-train-mode", Severity.ERROR if ev.has_data else Severity.WARNING,
                    _names(candidates), evidence,
                    f"{len(candidates)} norm layers have frozen affine parameters but run in train mode: "
                    "training normalises with batch statistics while eval uses running statistics of other data.",
                    fix)]


def mismatch(ev: Evidence, exclude: set[str]) -> list[Finding]:
    if not ev.has_data:
        return []
    candidates = [l for l in ev.layers if _drifted(l) and l.name not in exclude]
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
             and not l.per_instance]
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
    if not layers:
        return []
    return [Finding("batch-dependent-eval", Severity.WARNING, _names(layers), {"layers": len(layers)},
                    f"{len(layers)} norm layers keep no running statistics, so in eval mode they normalise each "
                    "batch by itself and a prediction depends on the other samples in its batch.",
                    "Construct them with `track_running_stats=True` (the default) and recalibrate, or use "
                    "GroupNorm/LayerNorm if batch independence is not needed at train time.")]


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


def find_causes(ev: Evidence) -> tuple[Finding, ...]:
    findings = corrupt(ev)
    explained = {name for f in findings for name in f.layers}
    findings += [f for f in never_updated(ev) if not explained.issuperset(f.layers)]
    explained |= {name for f in findings for name in f.layers}
    unconverged = not_converged(ev, explained)
    findings += unconverged
    frozen = frozen_in_train_mode(ev)
    recent = dominated_by_recent(ev)
    for group in (unconverged, frozen, recent):
        explained |= {name for f in group for name in f.layers}
    findings += frozen + recent + mismatch(ev, explained)
    rules: list[Callable[[Evidence], list[Finding]]] = [small_batches, label_sorted, dropout_shift,
                                                        batch_dependent, reused, ranks_differ]
    for rule in rules:
        findings += rule(ev)
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return tuple(sorted(findings, key=lambda f: order[f.severity]))
