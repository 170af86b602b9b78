"""Per-layer comparison of running statistics with the true input statistics."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .frameworks import NormLayer
from .report import ChannelStats, LayerReport
from .stats import LayerInputStats, drift_metrics, ema_initial_weight


def _stats_at_init(mean: torch.Tensor | None, var: torch.Tensor | None) -> bool:
    return mean is not None and var is not None and bool((mean == 0).all() and (var == 1).all())


def _stats_corrupt(mean: torch.Tensor | None, var: torch.Tensor | None) -> bool:
    if mean is None or var is None:
        return False
    return not bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all())


def measure_layer(
    layer: NormLayer,
    stats: LayerInputStats | None,
    *,
    forwards: int,
    dropout_stats: LayerInputStats | None = None,
    initial_training: bool = False,
) -> LayerReport:
    running_mean, running_var = layer.running_mean(), layer.running_var()
    nbt = layer.num_batches_tracked()
    shift = ratio = drift = None
    channels = None
    spread = None
    if stats is not None and running_mean is not None and running_var is not None \
            and running_mean.shape == stats.mean.shape:
        # Compare with what exact statistics would store in this layer's convention: PyTorch keeps
        # unbiased variances (InstanceNorm: the mean of per-instance ones), Keras the biased one.
        target_var = stats.var_unbiased if layer.stores_unbiased_variance else stats.var
        metrics = drift_metrics(stats.mean, target_var, running_mean, running_var, layer.eps)
        shift, ratio, drift = metrics.mean_shift, metrics.var_ratio, metrics.drift
        channels = ChannelStats(
            true_mean=tuple(stats.mean.tolist()),
            true_var=tuple(stats.var.tolist()),
            true_var_unbiased=tuple(stats.var_unbiased.tolist()),
            running_mean=tuple(running_mean.tolist()),
            running_var=tuple(running_var.tolist()),
        )
    if stats is not None and not layer.per_instance:
        spread = _mean(torch.sqrt(stats.batch_mean_dispersion / (stats.var + layer.eps)))
    dropout_ratio = None
    if dropout_stats is not None and stats is not None:
        dropout_ratio = _mean((dropout_stats.var + layer.eps) / (stats.var + layer.eps))
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
