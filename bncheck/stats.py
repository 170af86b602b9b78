"""Exact streaming statistics of a norm layer's input, and drift metrics.

Pure functions over tensors: no hooks, no I/O. Tensors stay on the device they come
from; :meth:`LayerStatsState.to_cpu` moves a finished accumulation once.

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

Moments come from two sources. :func:`moments_of` reads a layer's input in
float64. :func:`moments_of_groups` takes the per-batch mean and unbiased variance
that BatchNorm's own train-mode kernel computed (read from its running buffers with
momentum 1, as fvcore's PreciseBN does) and merges them exactly: with ``n_k``
samples per group, ``M2_k = var_k * (n_k - 1)`` undoes the Bessel correction.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Moments:
    """Per-channel sample count, mean and sum of squared deviations (float64)."""

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

    def to_cpu(self) -> "Moments":
        return Moments(self.count, self.mean.cpu(), self.m2.cpu())


def moments_of(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Exact per-channel moments of one tensor, computed in float64."""
    x = x.detach()
    channel_dim %= x.dim()
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    count = x.numel() // x.shape[channel_dim]
    # torch's var_mean is a stable two-pass reduction; in float64 it is exact to ~1e-15.
    var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
    return Moments(float(count), mean, var * count)


def per_instance_moments(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """Moments of each ``(instance, channel)`` pair, flattened to ``N*C`` rows.

    Used for InstanceNorm, whose running statistics average per-instance statistics.
    """
    moved = x.detach().movedim(channel_dim, 1)
    flat = moved.reshape(moved.shape[0] * moved.shape[1], -1).to(torch.float64)
    var, mean = torch.var_mean(flat, dim=1, correction=0)
    return Moments(float(flat.shape[1]), mean, var * flat.shape[1])


def moments_of_groups(counts: list[float], means: torch.Tensor, unbiased_vars: torch.Tensor
                      ) -> tuple[Moments, torch.Tensor]:
    """Exact moments of ``K`` groups given per group ``n_k``, mean and unbiased variance ``(K, C)``.

    Returns the total moments and the within-group sum ``sum_k M2_k``. Groups of equal size are
    combined at once, their mean first, so ``M2 = sum_k M2_k + n sum_k (mean_k - mean)^2`` has no
    cancellation; groups of different sizes then merge with Chan's formula. Counts stay Python
    numbers, so nothing is copied between host and device.
    """
    means, unbiased_vars = means.to(torch.float64), unbiased_vars.to(torch.float64)
    total, within = None, None
    for count in sorted(set(counts)):
        rows = [i for i, c in enumerate(counts) if c == count]
        group_means = means[rows] if len(rows) < len(counts) else means
        group_vars = unbiased_vars[rows] if len(rows) < len(counts) else unbiased_vars
        mean = group_means.mean(0)
        group_within = group_vars.sum(0) * (count - 1)
        m2 = group_within + (group_means - mean).pow(2).sum(0) * count
        total = merge(total, Moments(count * len(rows), mean, m2))
        within = group_within if within is None else within + group_within
    return total, within


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
    in its own convention (PyTorch: ``var_unbiased``; Keras: ``var``).
    ``batch_mean_dispersion`` is the weighted variance of per-batch means (BatchNorm
    only; zero for InstanceNorm).
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


@dataclass(frozen=True)
class LayerStatsState:
    """A mergeable accumulation of one layer's input statistics (e.g. one process's share).

    ``groups`` counts the batches (calls) merged in, ``within_m2`` their within-batch sums of
    squares; for InstanceNorm ``instance_var_sum`` adds each instance's unbiased variance.
    """

    total: Moments
    within_m2: torch.Tensor
    groups: int
    min_count: float
    max_count: float
    instance_var_sum: torch.Tensor | None = None
    num_instances: int = 0

    def to_cpu(self) -> "LayerStatsState":
        inst = None if self.instance_var_sum is None else self.instance_var_sum.cpu()
        return replace(self, total=self.total.to_cpu(), within_m2=self.within_m2.cpu(), instance_var_sum=inst)


def merge_states(a: LayerStatsState | None, b: LayerStatsState | None) -> LayerStatsState | None:
    """Exact merge of two accumulations (Chan for the moments, sums for the rest)."""
    if a is None or b is None:
        return b if a is None else a
    inst = None if a.instance_var_sum is None else a.instance_var_sum + b.instance_var_sum
    return LayerStatsState(merge(a.total, b.total), a.within_m2 + b.within_m2, a.groups + b.groups,
                           min(a.min_count, b.min_count), max(a.max_count, b.max_count), inst,
                           a.num_instances + b.num_instances)


def finalize(state: LayerStatsState | None, calls: int) -> LayerInputStats | None:
    """The population statistics an accumulation describes."""
    if state is None:
        return None
    total = state.total
    if state.instance_var_sum is not None:
        var = state.within_m2 / total.count
        var_unbiased = state.instance_var_sum / max(state.num_instances, 1)
        dispersion = torch.zeros_like(total.mean)
    else:
        var = total.variance(unbiased=False)
        var_unbiased = total.variance(unbiased=True)
        dispersion = between_group_dispersion(total, state.within_m2)
    return LayerInputStats(total, total.mean, var, var_unbiased, dispersion, state.groups, state.min_count,
                           state.max_count, calls)


def resting_stats(mean: torch.Tensor | None, unbiased_var: torch.Tensor | None):
    """Running statistics that are safe under a momentum-1 kernel, which computes ``0 * old + batch``
    (0 * NaN is NaN): non-finite means become 0, non-finite or negative variances 1. New tensors."""
    mean = None if mean is None else torch.where(torch.isfinite(mean), mean, 0.0)
    ok = None if unbiased_var is None else torch.isfinite(unbiased_var) & (unbiased_var >= 0)
    return mean, None if unbiased_var is None else torch.where(ok, unbiased_var, 1.0)


KERNEL_STATS_ROWS = 64   # batches of kernel statistics buffered on the device per layer, merged at once


class InputStatsAccumulator:
    """Streams one norm layer's batches into exact float64 moments on their device.

    :meth:`add` reads an input tensor; :meth:`add_batch_stats` takes the mean and
    unbiased variance BatchNorm's kernel computed for a batch of ``count`` samples per
    channel. Kernel statistics are buffered and merged ``flush_every`` batches at a time,
    so there is no host synchronisation per batch. Each call returns views of the buffer
    row the next batch goes in: a layer whose kernel writes its statistics straight there
    saves the copy. A free row holds ``resting`` (the layer's own running statistics, made
    safe by :func:`resting_stats`; zeros and ones without them): the model sees them as its
    running statistics during the forward, as it would under ``model.train()``.
    """

    def __init__(self, channel_dim: int = 1, per_instance: bool = False, flush_every: int = KERNEL_STATS_ROWS,
                 resting: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)):
        self.channel_dim, self.per_instance, self.flush_every = channel_dim, per_instance, flush_every
        self._resting = resting
        self.state: LayerStatsState | None = None
        self.calls = 0
        # Rows of means and of unbiased variances, allocated once, and a view of each row.
        self._means: torch.Tensor | None = None
        self._vars: torch.Tensor | None = None
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_counts: list[float] = []

    def add(self, x: torch.Tensor) -> None:
        self.calls += 1
        channel_dim = self.channel_dim % x.dim()
        batch = moments_of(x, channel_dim)
        inst, within, count = None, batch.m2, batch.count
        if self.per_instance:
            moments = per_instance_moments(x, channel_dim)
            channels = batch.num_channels
            within = moments.m2.view(-1, channels).sum(dim=0)
            # InstanceNorm's running_var averages each instance's unbiased variance.
            inst = moments.variance(unbiased=True).view(-1, channels).sum(dim=0)
        part = LayerStatsState(batch, within, 1, count, count, inst, int(x.shape[0]) if self.per_instance else 0)
        self.state = merge_states(self.state, part)

    def add_batch_stats(self, count: float, mean: torch.Tensor, unbiased_var: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if self._means is None or self._means.shape[1] != mean.numel() or self._means.dtype is not mean.dtype:
            self._allocate(mean)
        row = self._rows[len(self._pending_counts)]
        if not self.offered(mean, unbiased_var):  # the kernel wrote elsewhere
            row[0].copy_(mean.detach())
            row[1].copy_(unbiased_var.detach())
        self._pending_counts.append(float(count))
        if len(self._pending_counts) >= self.flush_every:
            self._flush()
        return self._rows[len(self._pending_counts)]

    def offered(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> bool:
        """Whether these are the views of the row this accumulator offered for the next batch."""
        row = self._rows[len(self._pending_counts)] if self._rows else None
        return row is not None and mean is row[0] and unbiased_var is row[1]

    def _allocate(self, like: torch.Tensor) -> None:
        """One buffer each, written row by row: no small allocation per batch that would outlive the
        batch's activations and fragment the heap (peak memory grew with the number of batches)."""
        self._flush()
        shape = (self.flush_every, like.numel())
        # Normal tensors even inside a forward under inference_mode: they are reset after it.
        with torch.inference_mode(False):
            self._means = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._vars = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._rows = list(zip(self._means.unbind(0), self._vars.unbind(0)))
        self._resting = tuple(None if value is None or value.numel() != like.numel() else value.to(like)
                              for value in self._resting)
        self._reset_rows()

    def _reset_rows(self) -> None:
        for buffer, value, default in ((self._means, self._resting[0], 0.0), (self._vars, self._resting[1], 1.0)):
            buffer.copy_(value) if value is not None else buffer.fill_(default)

    def _flush(self) -> None:
        if not self._pending_counts:
            return
        counts, rows = self._pending_counts, len(self._pending_counts)
        total, within = moments_of_groups(counts, self._means[:rows], self._vars[:rows])
        part = LayerStatsState(total, within, rows, min(counts), max(counts))
        self.state = merge_states(self.state, part)
        self._pending_counts = []
        self._reset_rows()   # the merged moments are new tensors: the rows are free again

    def finish(self) -> LayerStatsState | None:
        """The accumulation so far, on the CPU."""
        self._flush()
        return None if self.state is None else self.state.to_cpu()

    def result(self) -> LayerInputStats | None:
        return finalize(self.finish(), self.calls)
