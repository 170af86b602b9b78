"""Exact streaming statistics of a norm layer's input, and drift metrics.

Pure functions over tensors: no hooks, no I/O.

Per channel we keep ``(n, mean, M2)`` in float64, where ``M2 = sum (x - mean)^2``.
Two sets of moments merge with Chan et al.'s parallel formula (Chan, Golub &
LeVeque, 1979)::

    delta = mean_b - mean_a
    n     = n_a + n_b
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

so any split of the data into batches gives the same result, with no
``E[x^2] - E[x]^2`` cancellation. Every spatial position counts as a sample,
as in BatchNorm itself.

Population variance is ``M2 / n`` (biased, what train-mode normalisation uses)
or ``M2 / (n - 1)`` (unbiased, what PyTorch stores in ``running_var``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Moments:
    """Per-channel sample count, mean and sum of squared deviations (float64, CPU)."""

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def num_channels(self) -> int:
        return int(self.mean.numel())

    def variance(self, *, unbiased: bool = False) -> torch.Tensor:
        denom = self.count - 1 if unbiased else self.count
        if denom <= 0:
            return torch.full_like(self.m2, float("nan"))
        return self.m2 / denom


def moments_of(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Exact per-channel moments of one tensor, computed in float64."""
    x = x.detach()
    channel_dim %= x.dim()
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    count = x.numel() // x.shape[channel_dim]
    # torch's var_mean is a stable two-pass reduction; in float64 it is exact to ~1e-15.
    var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
    return Moments(float(count), mean.cpu(), (var * count).cpu())


def per_instance_moments(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Moments of each ``(instance, channel)`` pair, flattened to ``N*C`` rows.

    Used for InstanceNorm, whose running statistics average per-instance statistics.
    """
    moved = x.detach().movedim(channel_dim, 1)
    flat = moved.reshape(moved.shape[0] * moved.shape[1], -1).to(torch.float64)
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    return Moments(float(flat.shape[1]), mean.cpu(), (var * flat.shape[1]).cpu())


def merge(a: Moments | None, b: Moments) -> Moments:
    """Chan's parallel merge of two sets of per-channel moments."""
    if a is None or a.count == 0:
        return b
    if b.count == 0:
        return a
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge moments of {a.num_channels} and {b.num_channels} channels")
    count = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    m2 = a.m2 + b.m2 + delta.pow(2) * (a.count * b.count / count)
    return Moments(count, mean, m2)


def merge_all(parts) -> Moments | None:
    total = None
    for part in parts:
        total = merge(total, part)
    return total


@dataclass(frozen=True)
class DriftMetrics:
    """How far running statistics are from the true statistics, per channel.

    * ``mean_shift = |mu_run - mu| / sqrt(var + eps)``: the shift in units of the
      true standard deviation.
    * ``var_ratio = (var_run + eps) / (var + eps)``: 1 is perfect.
    * ``drift``: the 2-Wasserstein distance between the Gaussians
      ``N(mu_run, var_run + eps)`` and ``N(mu, var + eps)`` in units of the true
      standard deviation, ``sqrt(mean_shift^2 + (sqrt(var_ratio) - 1)^2)``.
      0 means the running statistics are exact; 1 means eval mode misplaces the
      activations by about one standard deviation.
    """

    mean_shift: torch.Tensor
    var_ratio: torch.Tensor
    drift: torch.Tensor


def drift_metrics(
    true_mean: torch.Tensor,
    true_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> DriftMetrics:
    true_mean = true_mean.to(torch.float64)
    true_var = true_var.to(torch.float64)
    running_mean = running_mean.to(torch.float64)
    running_var = running_var.to(torch.float64)
    true_std = torch.sqrt(true_var + eps)
    mean_shift = (running_mean - true_mean).abs() / true_std
    var_ratio = (running_var + eps) / (true_var + eps)
    drift = torch.sqrt(mean_shift.pow(2) + (torch.sqrt(var_ratio) - 1.0).pow(2))
    return DriftMetrics(mean_shift, var_ratio, drift)


def between_group_dispersion(total: Moments, within_m2: torch.Tensor) -> torch.Tensor:
    """Weighted variance of group (batch) means around the overall mean, per channel.

    ``total.m2 = within_m2 + sum_g n_g (mean_g - mean)^2``, so the between-group
    part is what is left once the within-group sums of squares are removed.
    """
    if total.count <= 0:
        return torch.zeros_like(total.mean)
    return (total.m2 - within_m2).clamp_min(0.0) / total.count


def ema_initial_weight(momentum: float | None, num_updates: int | None) -> float | None:
    """Weight a PyTorch-style EMA still gives its initial value after ``num_updates``.

    ``running = (1 - m) * running + m * batch`` leaves ``(1 - m)^n`` on the
    initial value. With ``momentum=None`` PyTorch keeps a cumulative average, whose
    initial value is fully replaced after one update.
    """
    if num_updates is None:
        return None
    if momentum is None:
        return 1.0 if num_updates == 0 else 0.0
    return float((1.0 - momentum) ** num_updates)


@dataclass(frozen=True)
class LayerInputStats:
    """True statistics of one norm layer's input over the whole data.

    ``mean``/``var`` (biased) and ``var_unbiased`` are the population moments over all
    samples and positions for BatchNorm, and the means of per-instance moments for
    InstanceNorm; a layer's running statistics should equal ``mean`` and the variance
    in its own convention (PyTorch: ``var_unbiased``; Keras: ``var``). ``batch_mean_dispersion`` is the weighted variance of
    per-batch means (BatchNorm only; zero for InstanceNorm).
    """

    total: Moments
    mean: torch.Tensor
    var: torch.Tensor
    var_unbiased: torch.Tensor
    batch_mean_dispersion: torch.Tensor
    num_batches: int
    min_batch_count: float
    max_batch_count: float
    calls: int


class InputStatsAccumulator:
    """Streams a norm layer's inputs into exact float64 moments, one batch at a time."""

    def __init__(self, channel_dim: int = 1, per_instance: bool = False):
        self.channel_dim = channel_dim
        self.per_instance = per_instance
        self.total: Moments | None = None
        self.within_m2: torch.Tensor | None = None
        self.instance_var_unbiased_sum: torch.Tensor | None = None
        self.num_instances = 0
        self.num_batches = 0
        self.min_batch_count = float("inf")
        self.max_batch_count = 0.0
        self.calls = 0

    def add(self, x: torch.Tensor) -> None:
        self.calls += 1
        channel_dim = self.channel_dim % x.dim()
        batch = moments_of(x, channel_dim)
        self.total = merge(self.total, batch)
        self.num_batches += 1
        self.min_batch_count = min(self.min_batch_count, batch.count)
        self.max_batch_count = max(self.max_batch_count, batch.count)
        if self.per_instance:
            inst = per_instance_moments(x, channel_dim)
            channels = batch.num_channels
            within = inst.m2.view(-1, channels).sum(dim=0)
            # InstanceNorm's running_var averages each instance's unbiased variance.
            unbiased = inst.variance(unbiased=True).view(-1, channels).sum(dim=0)
            self.instance_var_unbiased_sum = _add(self.instance_var_unbiased_sum, unbiased)
            self.num_instances += inst.num_channels // channels
        else:
            within = batch.m2
        self.within_m2 = _add(self.within_m2, within)

    def result(self) -> LayerInputStats | None:
        if self.total is None:
            return None
        total = self.total
        if self.per_instance:
            var = self.within_m2 / total.count
            var_unbiased = self.instance_var_unbiased_sum / max(self.num_instances, 1)
            dispersion = torch.zeros_like(total.mean)
        else:
            var = total.variance(unbiased=False)
            var_unbiased = total.variance(unbiased=True)
            dispersion = between_group_dispersion(total, self.within_m2)
        return LayerInputStats(
            total=total,
            mean=total.mean,
            var=var,
            var_unbiased=var_unbiased,
            batch_mean_dispersion=dispersion,
            num_batches=self.num_batches,
            min_batch_count=self.min_batch_count,
            max_batch_count=self.max_batch_count,
            calls=self.calls,
        )


def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.clone() if acc is None else acc + value
