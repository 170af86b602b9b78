"""Exact streaming moments and drift metrics against independent torch.cat references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bncheck.stats import (
    InputStatsAccumulator,
    Moments,
    between_group_dispersion,
    drift_metrics,
    ema_initial_weight,
    merge,
    merge_all,
    moments_of,
    moments_of_groups,
    per_instance_moments,
    resting_stats,
)
from conftest import channel_moments


def test_moments_of_matches_torch_reference_in_float64():
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(0)) * 3 + 7
    m = moments_of(x)
    mean, var, var_unbiased = channel_moments(x)
    assert m.count == 6 * 4 * 3
    assert m.mean.dtype == torch.float64 and m.m2.dtype == torch.float64
    torch.testing.assert_close(m.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.variance(), var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.variance(unbiased=True), var_unbiased, rtol=1e-12, atol=1e-12)


def test_moments_of_other_channel_dim():
    x = torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(1))
    m = moments_of(x, channel_dim=-1)
    ref = x.double().reshape(-1, 7)
    torch.testing.assert_close(m.mean, ref.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.variance(unbiased=True), ref.var(0), rtol=1e-12, atol=1e-12)


def test_large_offset_keeps_float64_precision():
    # E[x^2] - E[x]^2 in float32 would lose the variance completely at this offset.
    g = torch.Generator().manual_seed(2)
    base = torch.randn(400, 2, generator=g, dtype=torch.float64)
    x = (base + 1e4).to(torch.float32)
    parts = [moments_of(chunk) for chunk in x.split(37)]
    total = merge_all(parts)
    ref = x.double()
    torch.testing.assert_close(total.mean, ref.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(total.variance(unbiased=True), ref.var(0), rtol=1e-9, atol=0)
    assert total.variance().min() > 0.5  # the unit-variance noise survived


def test_merge_equals_moments_of_concatenation():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, 2, 2, generator=g)
    b = torch.randn(9, 4, 2, 2, generator=g) * 2 - 1
    merged = merge(moments_of(a), moments_of(b))
    mean, var, var_unbiased = channel_moments(torch.cat([a, b]))
    assert merged.count == 14 * 4
    torch.testing.assert_close(merged.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.variance(), var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.variance(unbiased=True), var_unbiased, rtol=1e-12, atol=1e-12)


def test_merge_identities_and_channel_mismatch():
    m = moments_of(torch.randn(3, 2))
    empty = Moments(0.0, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert merge(None, m) is m
    assert merge(empty, m) is m
    assert merge(m, empty) is m
    assert merge_all([]) is None
    with pytest.raises(ValueError, match="2 and 3 channels"):
        merge(m, moments_of(torch.randn(3, 3)))


def test_variance_of_too_few_samples_is_nan():
    m = moments_of(torch.tensor([[1.0, 2.0]]))
    assert m.count == 1
    assert torch.isnan(m.variance(unbiased=True)).all()
    assert torch.equal(m.variance(), torch.zeros(2, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=60),
    cuts=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=8),
    seed=st.integers(min_value=0, max_value=2**16),
    scale=st.floats(min_value=1e-3, max_value=1e3),
    offset=st.floats(min_value=-1e3, max_value=1e3),
)
def test_any_uneven_split_gives_the_same_moments(n, cuts, seed, scale, offset):
    x = torch.randn(n, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + offset
    bounds = sorted({int(c * n) for c in cuts} - {0, n})
    sizes = [b - a for a, b in zip([0, *bounds], [*bounds, n])]
    split = merge_all(moments_of(part) for part in x.split(sizes))
    whole = moments_of(x)
    assert split.count == whole.count == n * 2
    torch.testing.assert_close(split.mean, whole.mean, rtol=1e-10, atol=1e-10 * scale)
    # Float64 rounding of values near `offset` is ~eps*|offset|; relative to the spread `scale` that
    # bounds how well any two evaluations of M2 can agree.
    conditioning = 1e-10 + 8 * torch.finfo(torch.float64).eps * abs(offset) / scale
    torch.testing.assert_close(split.m2, whole.m2, rtol=conditioning, atol=1e-10 * scale**2)
    # and both agree with the independent reference
    torch.testing.assert_close(whole.variance(unbiased=True), channel_moments(x)[2], rtol=1e-10,
                               atol=1e-10 * scale**2)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=2, max_value=9), min_size=1, max_size=7),
       seed=st.integers(min_value=0, max_value=2**16), offset=st.floats(min_value=-50, max_value=50))
def test_groups_from_per_batch_mean_and_unbiased_variance_merge_exactly(sizes, seed, offset):
    """What BatchNorm's kernel reports per batch (mean, unbiased variance) merges into the
    moments of the concatenated batches, for any mix of batch sizes."""
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, 3, 2, generator=g, dtype=torch.float64) * 2 + offset for n in sizes]
    counts = [float(b.shape[0] * 2) for b in batches]
    means = torch.stack([channel_moments(b)[0] for b in batches])
    variances = torch.stack([channel_moments(b)[2] for b in batches])
    total, within = moments_of_groups(counts, means, variances)
    whole = moments_of(torch.cat(batches))
    assert total.count == whole.count
    torch.testing.assert_close(total.mean, whole.mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(total.m2, whole.m2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(within, sum(moments_of(b).m2 for b in batches), rtol=1e-9, atol=1e-9)


def test_per_instance_moments_rows_are_instance_channel_pairs():
    x = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(4))
    m = per_instance_moments(x)
    assert m.count == 20 and m.num_channels == 6
    ref = x.double().reshape(6, 20)
    torch.testing.assert_close(m.mean, ref.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.variance(unbiased=True), ref.var(1), rtol=1e-12, atol=1e-12)


def test_accumulator_batchnorm_totals_and_between_batch_dispersion():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(k, 3, 2, 2, generator=g) + shift for k, shift in ((4, 0.0), (7, 2.0), (2, -1.0), (5, 0.5))]
    acc = InputStatsAccumulator(channel_dim=1)
    for b in batches:
        acc.add(b)
    result = acc.result()
    mean, var, var_unbiased = channel_moments(torch.cat(batches))
    torch.testing.assert_close(result.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.var, var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.var_unbiased, var_unbiased, rtol=1e-12, atol=1e-12)
    # Between-batch dispersion: the weighted variance of the batch means, computed directly.
    counts = torch.tensor([b.shape[0] * 4 for b in batches], dtype=torch.float64)
    batch_means = torch.stack([channel_moments(b)[0] for b in batches])
    weights = counts / counts.sum()
    direct = (weights[:, None] * (batch_means - mean).pow(2)).sum(0)
    torch.testing.assert_close(result.batch_mean_dispersion, direct, rtol=1e-10, atol=1e-12)
    assert result.num_batches == result.calls == 4
    assert result.min_batch_count == 8 and result.max_batch_count == 28
    assert result.total.count == counts.sum().item()


def test_kernel_statistics_written_into_the_offered_rows_merge_like_copied_ones():
    """A layer's kernel writes each batch's statistics into the row the accumulator offered; rows are
    reused after every merge of ``flush_every`` batches, and a batch written elsewhere is copied in."""
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(k, 3, 5, generator=g) * 2 + 1.5 for k in (6, 6, 4, 6, 6, 3, 6, 5)]
    acc = InputStatsAccumulator(flush_every=3)
    rows, in_place = None, []
    for i, b in enumerate(batches):
        mean, _var, unbiased = (t.float() for t in channel_moments(b))
        if rows is not None and i != 4:  # batch 4 comes from some other buffer
            rows[0].copy_(mean)
            rows[1].copy_(unbiased)
            mean, unbiased = rows
        in_place.append(rows is not None and mean is rows[0])
        rows = acc.add_batch_stats(float(b.numel() // 3), mean, unbiased)
        assert rows[0].shape == rows[1].shape == (3,)
    assert in_place == [False, True, True, True, False, True, True, True]
    result = acc.result()
    mean, var, unbiased = channel_moments(torch.cat(batches))
    torch.testing.assert_close(result.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.var_unbiased, unbiased, rtol=1e-6, atol=1e-6)
    assert result.num_batches == result.calls == 8 and result.total.count == sum(b.numel() // 3 for b in batches)


def test_free_rows_hold_the_resting_statistics_never_a_nan_a_momentum_one_kernel_would_keep():
    """A free row is what the model sees as running statistics during the forward, and what a kernel
    with momentum 1 multiplies by 0: the layer's own statistics, made finite, or zeros and ones."""
    mean, var = resting_stats(torch.tensor([0.5, float("nan"), -2.0]), torch.tensor([4.0, -1.0, float("inf")]))
    assert mean.tolist() == [0.5, 0.0, -2.0] and var.tolist() == [4.0, 1.0, 1.0]
    plain = InputStatsAccumulator(flush_every=2)
    rows = plain.add_batch_stats(4.0, torch.full((3,), float("nan")), torch.ones(3))
    assert rows[0].tolist() == [0.0] * 3 and rows[1].tolist() == [1.0] * 3
    acc = InputStatsAccumulator(flush_every=2, resting=(mean.double(), var.double()))
    rows = acc.add_batch_stats(4.0, torch.zeros(3), torch.ones(3))
    assert rows[0].tolist() == [0.5, 0.0, -2.0] and rows[1].tolist() == [4.0, 1.0, 1.0]
    rows[0].copy_(torch.tensor([1.0, 2.0, 3.0]))   # the kernel writes the second batch in place
    rows = acc.add_batch_stats(4.0, *rows)          # the buffer is full: merged, and the rows are free again
    assert rows[0].tolist() == [0.5, 0.0, -2.0] and rows[1].tolist() == [4.0, 1.0, 1.0]
    torch.testing.assert_close(acc.result().mean, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))


def test_dispersion_is_zero_for_identical_batches():
    b = torch.randn(6, 2, generator=torch.Generator().manual_seed(6))
    acc = InputStatsAccumulator()
    for _ in range(3):
        acc.add(b)
    assert acc.result().batch_mean_dispersion.abs().max() < 1e-12


def test_between_group_dispersion_directly():
    total = Moments(10.0, torch.zeros(1, dtype=torch.float64), torch.tensor([30.0], dtype=torch.float64))
    assert between_group_dispersion(total, torch.tensor([20.0], dtype=torch.float64)).item() == pytest.approx(1.0)
    # rounding can make within > total: clamped to zero, never negative
    assert between_group_dispersion(total, torch.tensor([30.5], dtype=torch.float64)).item() == 0.0
    empty = Moments(0.0, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(between_group_dispersion(empty, torch.zeros(2)), torch.zeros(2, dtype=torch.float64))


def test_accumulator_instancenorm_uses_mean_of_per_instance_variances():
    g = torch.Generator().manual_seed(7)
    # instances with very different means: the pooled variance is much larger than
    # any per-instance variance, and InstanceNorm must use the latter.
    batches = [torch.randn(k, 2, 3, 3, generator=g) + 5 * torch.randn(k, 2, 1, 1, generator=g) for k in (3, 5)]
    acc = InputStatsAccumulator(channel_dim=1, per_instance=True)
    for b in batches:
        acc.add(b)
    result = acc.result()
    x = torch.cat(batches).double()
    per_inst_var = x.var(dim=(2, 3), unbiased=False)        # (N, C)
    per_inst_var_unb = x.var(dim=(2, 3), unbiased=True)
    torch.testing.assert_close(result.mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.var, per_inst_var.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.var_unbiased, per_inst_var_unb.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(result.batch_mean_dispersion, torch.zeros(2, dtype=torch.float64))
    pooled = channel_moments(x)[1]
    assert (pooled > 3 * result.var).all()


def test_empty_accumulator_has_no_result():
    assert InputStatsAccumulator().result() is None


def test_drift_metrics_hand_computed():
    eps = 1e-5
    true_mean = torch.tensor([0.0, 1.0, -2.0])
    true_var = torch.tensor([4.0, 1.0, 0.25])
    run_mean = torch.tensor([0.0, 4.0, -2.0])
    run_var = torch.tensor([4.0, 1.0, 1.0])
    m = drift_metrics(true_mean, true_var, run_mean, run_var, eps)
    expected_shift = torch.tensor([0.0, 3.0 / math.sqrt(1.0 + eps), 0.0], dtype=torch.float64)
    expected_ratio = torch.tensor([1.0, 1.0, (1.0 + eps) / (0.25 + eps)], dtype=torch.float64)
    torch.testing.assert_close(m.mean_shift, expected_shift, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.var_ratio, expected_ratio, rtol=1e-12, atol=1e-12)
    # W2 between N(mu_run, s_run^2) and N(mu, s^2) in units of s: sqrt(shift^2 + (s_run/s - 1)^2)
    expected_drift = torch.tensor([0.0, 3.0 / math.sqrt(1.0 + eps), math.sqrt((1 + eps) / (0.25 + eps)) - 1.0],
                                  dtype=torch.float64)
    torch.testing.assert_close(m.drift, expected_drift, rtol=1e-12, atol=1e-12)
    assert m.drift.dtype == torch.float64


def test_drift_metrics_are_zero_for_exact_stats_and_symmetric_in_mean_sign():
    mean, var = torch.tensor([1.5, -0.5]), torch.tensor([2.0, 0.1])
    exact = drift_metrics(mean, var, mean, var, 1e-5)
    assert torch.equal(exact.drift, torch.zeros(2, dtype=torch.float64))
    up = drift_metrics(mean, var, mean + 1, var, 1e-5)
    down = drift_metrics(mean, var, mean - 1, var, 1e-5)
    torch.testing.assert_close(up.mean_shift, down.mean_shift, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "momentum, updates, expected",
    [(0.1, 0, 1.0), (0.1, 1, 0.9), (0.1, 10, 0.9**10), (0.01, 100, 0.99**100), (1.0, 1, 0.0),
     (0.0, 50, 1.0), (None, 0, 1.0), (None, 1, 0.0), (None, 500, 0.0), (0.1, None, None)],
)
def test_ema_initial_weight(momentum, updates, expected):
    weight = ema_initial_weight(momentum, updates)
    if expected is None:
        assert weight is None
    else:
        assert weight == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ema_initial_weight_matches_a_real_batchnorm():
    bn = torch.nn.BatchNorm1d(1, momentum=0.3)
    for _ in range(5):
        bn(torch.full((4, 1), 10.0) + torch.arange(4.0)[:, None])  # batch mean 11.5
    # running_mean = (1 - w) * 11.5 with w the weight left on the initial 0
    w = ema_initial_weight(bn.momentum, int(bn.num_batches_tracked))
    assert bn.running_mean.item() == pytest.approx((1 - w) * 11.5, rel=1e-6)
