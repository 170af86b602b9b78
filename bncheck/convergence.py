"""How far running statistics still are from their 0/1 initial values: pure functions over a layer's record.

A moving average started at mean 0 / variance 1 and updated ``n`` times with momentum ``m`` holds
``w * (0, 1) + (1 - w) * (training statistics)`` with ``w = (1 - m)^n``. With data, bncheck compares the
running statistics with that blend and with the data's own statistics, per channel as points
``(mean, std)`` in units of the data's standard deviation; the distance between two points is the
2-Wasserstein distance of the two normal distributions, the drift's own measure.
"""
from __future__ import annotations

import math
from typing import Iterator

from .report import LayerReport

Point = tuple[float, float]


def _target_variances(layer: LayerReport) -> tuple[float, ...]:
    """The data's variance in the layer's own convention (PyTorch stores the unbiased one, Keras the biased)."""
    channels = layer.channels
    return channels.true_var if layer.framework == "keras" else channels.true_var_unbiased


def _channel_points(layer: LayerReport) -> Iterator[tuple[Point, Point, Point]]:
    """Per channel: the running statistics, the data's and the 0/1 initial values, in data-std units."""
    channels = layer.channels
    for mean, var, run_mean, run_var in zip(channels.true_mean, _target_variances(layer),
                                            channels.running_mean, channels.running_var):
        std = math.sqrt(var + layer.eps)
        running = (run_mean / std, math.sqrt(max(run_var, 0.0) + layer.eps) / std)
        yield running, (mean / std, 1.0), (0.0, math.sqrt(1.0 + layer.eps) / std)


def weight_left_at_init(layer: LayerReport) -> float | None:
    """The share of the way from the 0/1 initial values to the data's statistics that the running
    statistics have NOT covered, summed over channels: the EMA weight still on 0/1 when training saw
    statistics like the data's. Statistics of other data cover the way or more, giving 0."""
    if layer.channels is None:
        return None
    moved = total = 0.0
    for running, data, init in _channel_points(layer):
        moved += math.dist(running, init)
        total += math.dist(data, init)
    return max(0.0, 1.0 - moved / total) if total > 0 else None


def counter_blend_ratio(layer: LayerReport) -> float | None:
    """Distance of the running statistics from the blend the update counter predicts,
    ``w * (0, 1) + (1 - w) * data``, over their distance from the data's statistics (summed over channels).

    Well under 1 means the counter's story explains the drift: the statistics are still partly at 0/1.
    About 1 or more means they describe other data (a preprocessing or domain shift), whatever the counter."""
    weight = layer.initial_weight
    if layer.channels is None or weight is None:
        return None
    to_blend = to_data = 0.0
    for running, (data_mean, data_std), (_init_mean, init_std) in _channel_points(layer):
        blend = ((1.0 - weight) * data_mean, math.sqrt(weight * init_std ** 2 + (1.0 - weight) * data_std ** 2))
        to_blend += math.dist(running, blend)
        to_data += math.dist(running, (data_mean, data_std))
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
