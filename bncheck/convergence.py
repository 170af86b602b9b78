"""How far running statistics still are from their 0/1 initial values: pure functions over a layer's record.

A moving average started at mean 0 / variance 1 and updated ``n`` times with momentum ``m`` holds
``w * (0, 1) + (1 - w) * (training statistics)`` with ``w = (1 - m)^n``. With data, bncheck compares the
running statistics with that blend and with the data's own statistics, per channel as points
``(mean, std)`` in units of the data's standard deviation; the distance between two points is the
2-Wasserstein distance of the two normal distributions, the drift's own measure.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

from .report import LayerReport

if TYPE_CHECKING:
    import torch


def _target_variances(layer: LayerReport) -> tuple[float, ...]:
    """The data's variance in the layer's own convention (PyTorch stores the unbiased one, Keras the biased)."""
    channels = layer.channels
    return channels.true_var if layer.framework == "keras" else channels.true_var_unbiased


class _ChannelPoints(NamedTuple):
    """Per channel, as float64 tensors in data-std units: the running statistics ``(mean, std)``, the
    data's ``(mean, 1)`` and the 0/1 initial values ``(0, init_std)``."""

    running_mean: torch.Tensor
    running_std: torch.Tensor
    data_mean: torch.Tensor
    init_std: torch.Tensor


def _channel_points(layer: LayerReport) -> _ChannelPoints:
    """One tensor operation for all channels: wide models have tens of thousands of them."""
    import torch  # here: the renderers import this module, and rendering a saved report needs no torch

    channels = layer.channels
    mean, var, run_mean, run_var = (torch.tensor(values, dtype=torch.float64) for values in (
        channels.true_mean, _target_variances(layer), channels.running_mean, channels.running_var))
    std = (var + layer.eps).sqrt()
    return _ChannelPoints(run_mean / std, (run_var.clamp_min(0.0) + layer.eps).sqrt() / std, mean / std,
                          math.sqrt(1.0 + layer.eps) / std)


def _dist(mean_a, std_a, mean_b, std_b) -> torch.Tensor:
    """Per channel, the distance of two points ``(mean, std)``; one side at least is a tensor."""
    return ((mean_a - mean_b).square() + (std_a - std_b).square()).sqrt()


def weight_left_at_init(layer: LayerReport) -> float | None:
    """The share of the way from the 0/1 initial values to the data's statistics that the running
    statistics have NOT covered, summed over channels: the EMA weight still on 0/1 when training saw
    statistics like the data's. Statistics of other data cover the way or more, giving 0."""
    if layer.channels is None:
        return None
    p = _channel_points(layer)
    moved = float(_dist(p.running_mean, p.running_std, 0.0, p.init_std).sum())
    total = float(_dist(p.data_mean, 1.0, 0.0, p.init_std).sum())
    return max(0.0, 1.0 - moved / total) if total > 0 else None


def counter_blend_ratio(layer: LayerReport) -> float | None:
    """Distance of the running statistics from the blend the update counter predicts,
    ``w * (0, 1) + (1 - w) * data``, over their distance from the data's statistics (summed over channels).

    Well under 1 means the counter's story explains the drift: the statistics are still partly at 0/1.
    About 1 or more means they describe other data (a preprocessing or domain shift), whatever the counter."""
    weight = layer.initial_weight
    if layer.channels is None or weight is None:
        return None
    p = _channel_points(layer)
    blend_std = (weight * p.init_std ** 2 + (1.0 - weight)).sqrt()
    to_blend = float(_dist(p.running_mean, p.running_std, (1.0 - weight) * p.data_mean, blend_std).sum())
    to_data = float(_dist(p.running_mean, p.running_std, p.data_mean, 1.0).sum())
    return to_blend / to_data if to_data > 0 else None


def variance_below_counter_floor(layer: LayerReport, slack: float) -> bool:
    """``n`` EMA updates starting from ``running_var = 1`` keep at least ``(1 - m)^n`` of it, since batch
    variances are never negative. A smaller running variance cannot come from that counter: the statistics
    were recomputed (``update_bn``, ``bncheck recalibrate``) or the counter does not belong to them."""
    weight, lowest = layer.initial_weight, layer.running_var_min
    return weight is not None and lowest is not None and lowest < slack * weight


def cumulative_average_error(layer: LayerReport) -> float | None:
    """For ``momentum=None`` (a plain average of ``n`` batches): how far such an average typically misses
    the data's mean, in data-std units, from the spread of batch means (std of batch means / sqrt(n))."""
    n = layer.num_batches_tracked
    if not n or layer.batch_mean_spread is None:
        return None
    return layer.batch_mean_spread / math.sqrt(n)
