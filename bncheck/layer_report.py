"""Per-layer comparison of running statistics with the true input statistics."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .frameworks import NormLayer
from .report import ChannelStats, LayerReport
from .stats import LayerInputStats, drift_metrics, ema_initial_weight


def _stats_at_init(mean: torch.Tensor | None, var: torch.Tensor | None) -> bool:
    return var is not None and bool((var == 1).all()) and (mean is None or bool((mean == 0).all()))


def _stats_corrupt(mean: torch.Tensor | None, var: torch.Tensor | None) -> bool:
    if var is None:
        return False
    finite = bool(torch.isfinite(var).all() and (var >= 0).all())
    return not (finite and (mean is None or bool(torch.isfinite(mean).all())))


def _compare(layer: NormLayer, stats: LayerInputStats | None, running_mean, running_var):
    """Drift metrics against exact statistics in the layer's own convention, and per-channel values."""
    if stats is None or running_var is None or running_var.shape != stats.mean.shape:
        return None, None
    # PyTorch keeps unbiased variances (InstanceNorm: the mean of per-instance ones), Keras the biased
    # one. A layer that keeps only a running variance (EvoNorm) is compared on its variance alone.
    target_var = stats.var_unbiased if layer.stores_unbiased_variance else stats.var
    compared_mean = stats.mean if running_mean is None else running_mean
    metrics = drift_metrics(stats.mean, target_var, compared_mean, running_var, layer.eps)
    channels = None
    if running_mean is not None:
        channels = ChannelStats(tuple(stats.mean.tolist()), tuple(stats.var.tolist()),
                                tuple(stats.var_unbiased.tolist()), tuple(running_mean.tolist()),
                                tuple(running_var.tolist()))
    return metrics, channels


def _dropout_ratio(layer: NormLayer, dropout_stats, base) -> float | None:
    """Input variance with dropout on over off, on the same batches."""
    if dropout_stats is None or base is None:
        return None
    return _mean((dropout_stats.var + layer.eps) / (base.var + layer.eps))


def measure_layer(
    layer: NormLayer,
    stats: LayerInputStats | None,
    *,
    forwards: int,
    dropout_stats: LayerInputStats | None = None,
    dropout_base: LayerInputStats | None = None,
    initial_training: bool = False,
    order: int | None = None,
) -> LayerReport:
    running_mean, running_var = layer.running_mean(), layer.running_var()
    nbt = layer.num_batches_tracked()
    metrics, channels = _compare(layer, stats, running_mean, running_var)
    shift, ratio, drift = (None, None, None) if metrics is None else (metrics.mean_shift, metrics.var_ratio,
                                                                      metrics.drift)
    spread = None
    if stats is not None and not layer.per_instance:
        spread = _mean(torch.sqrt(stats.batch_mean_dispersion / (stats.var + layer.eps)))
    dropout_ratio = _dropout_ratio(layer, dropout_stats, dropout_base if dropout_base is not None else stats)
    if layer.framework == "keras":
        initial_weight = None if nbt is None else (layer.momentum or 0.0) ** nbt
    else:
        initial_weight = ema_initial_weight(layer.update_weight, nbt)
    return LayerReport(
        name=layer.name,
        type=layer.type_name,
        framework=layer.framework,
        per_instance=layer.per_instance,
        num_features=layer.num_features,
        momentum=layer.momentum,
        update_weight=layer.update_weight,
        eps=layer.eps,
        tracks_running_stats=layer.tracks_running_stats,
        num_batches_tracked=nbt,
        initial_weight=initial_weight,
        params_frozen=layer.params_frozen,
        training=initial_training,
        calls_per_forward=(stats.calls / forwards) if stats is not None and forwards else 0.0,
        batch_samples=stats.max_batch_count if stats is not None else None,
        mean_shift_max=_max(shift),
        mean_shift_mean=_mean(shift),
        var_ratio_max=_max(ratio),
        var_ratio_min=_min(ratio),
        drift=_mean(drift),
        drift_max=_max(drift),
        running_stats_at_init=_stats_at_init(running_mean, running_var),
        running_stats_corrupt=_stats_corrupt(running_mean, running_var),
        batch_mean_spread=spread,
        dropout_var_ratio=dropout_ratio,
        channels=channels,
        order=order,
        batch_stats_in_train=layer.batch_stats_in_train,
        running_var_min=_min(running_var),
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


def _max(t):
    return None if t is None or t.numel() == 0 else _finite(float(t.max()))


def _min(t):
    return None if t is None or t.numel() == 0 else _finite(float(t.min()))


def _mean(t):
    return None if t is None or t.numel() == 0 else _finite(float(t.mean()))


def forget_update_counts(reports, names) -> tuple[LayerReport, ...]:
    """Layers whose ``num_batches_tracked`` a checkpoint lacked: the counter left after loading is no
    count, so it and the EMA weight derived from it are unknown (None) rather than 0 and 1."""
    return tuple(replace(r, num_batches_tracked=None, initial_weight=None) if r.name in names else r
                 for r in reports)


def drift_sort_key(layer: LayerReport) -> tuple:
    """Most drifted first; layers without a drift (no running stats) last."""
    return (layer.drift is None, -(layer.drift or 0.0), layer.name)


def unmeasured_note(layers) -> tuple[str, ...]:
    """Name the norm layers no pass ran (auxiliary heads that only run in training, unused branches)."""
    idle = [l.name for l in layers if l.tracks_running_stats and l.channels is None and l.calls_per_forward == 0]
    if not idle:
        return ()
    shown = ", ".join(idle[:4]) + (", …" if len(idle) > 4 else "")
    return (f"{len(idle)} norm layers never ran in the passes ({shown}): not measured, and not recalibrated "
            "(auxiliary heads that run only in training, or branches the forward skips)",)
