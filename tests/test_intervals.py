"""Interval methods against known values and seeded coverage simulations; the --quick rule."""
from __future__ import annotations

import math

import pytest
import torch

import bncheck
from bncheck.intervals import (
    PairedTable,
    RatioSums,
    paired_difference_interval,
    ratio_interval,
    sequential_z,
    settles,
    t_quantile,
    wilson_interval,
    z_value,
)
from bncheck.outcomes import OutcomeMeter, relative_loss_interval
from bncheck.tasks import SampleScores, Task
from conftest import image_data, inject_drift, make_convnet, train_briefly

Z = z_value()


def test_wilson_interval_known_values():
    assert Z == pytest.approx(1.959964, abs=1e-6)
    assert wilson_interval(0, 10, Z) == pytest.approx((0.0, 0.27754), abs=1e-5)
    low, high = wilson_interval(5, 10, Z)
    assert (low, high) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 0, Z) == (0.0, 1.0)


def test_paired_interval_contains_the_estimate_and_respects_the_bounds():
    for table in (PairedTable(12, 9, 2, 21), PairedTable(0, 3, 0, 0), PairedTable(3, 0, 0, 0),
                  PairedTable(40, 0, 0, 60), PairedTable(0, 0, 5, 1)):
        low, high = paired_difference_interval(table, Z)
        diff = (table.first_only - table.second_only) / table.n
        assert -1.0 <= low <= diff <= high <= 1.0, (table, low, high)
    # no discordant pairs in a large sample: a narrow interval around 0
    low, high = paired_difference_interval(PairedTable(500, 0, 0, 500), Z)
    assert -0.01 < low <= 0 <= high < 0.01
    # three images, all right in train mode and one in eval mode: too few to exclude no gap ...
    low, high = paired_difference_interval(PairedTable.from_sums(3, 3, 1, 1), Z)
    assert low < 0 < 2 / 3 < high
    # ... but thirty are plenty
    assert paired_difference_interval(PairedTable.from_sums(30, 30, 10, 10), Z)[0] > 0.4


def _paired_coverage(p_both, p_first, p_second, n, trials, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([p_both, p_first, p_second, 1 - p_both - p_first - p_second])
    truth = p_first - p_second
    cells = torch.multinomial(probs, n * trials, replacement=True, generator=g).view(trials, n)
    covered = 0
    for row in cells:
        counts = torch.bincount(row, minlength=4).tolist()
        low, high = paired_difference_interval(PairedTable(*map(float, counts)), Z)
        covered += low <= truth <= high
    return covered / trials


@pytest.mark.parametrize("p_both, p_first, p_second, n", [
    (0.6, 0.05, 0.05, 50),    # healthy: rare discordant pairs both ways
    (0.3, 0.5, 0.0, 40),      # a large gap, eval never better
    (0.9, 0.02, 0.01, 200),   # near the boundary
])
def test_paired_interval_keeps_its_coverage(p_both, p_first, p_second, n):
    assert _paired_coverage(p_both, p_first, p_second, n, trials=600, seed=0) >= 0.92


def test_ratio_interval_matches_a_hand_computation_and_covers():
    d = torch.tensor([1.0, -0.5, 2.0, 0.0, 1.5], dtype=torch.float64)
    t = torch.tensor([2.0, 1.0, 3.0, 1.5, 2.5], dtype=torch.float64)
    sums = RatioSums(5, float(d.sum()), float(t.sum()), float((d * d).sum()), float((t * t).sum()),
                     float((d * t).sum()))
    ratio = d.sum() / t.sum()
    se = math.sqrt(float(((d - ratio * t) ** 2).sum()) / (5 * 4)) / float(t.mean())
    t4 = 2.7764451051977987  # Student's t, 4 degrees of freedom, 97.5% (scipy.stats.t.ppf)
    assert ratio_interval(sums, Z) == pytest.approx((float(ratio) - t4 * se, float(ratio) + t4 * se), rel=1e-9)
    assert ratio_interval(RatioSums(2, 1, 1, 1, 1, 1), Z) is None  # too few batches for an interval
    # coverage for per-image pixel accuracy: units of 16 correlated pixels
    g = torch.Generator().manual_seed(1)
    covered, trials = 0, 400
    for _ in range(trials):
        quality = torch.rand(60, generator=g) * 0.4 + 0.4           # each image's own difficulty
        gain = (torch.rand(60, 16, generator=g) < 0.15).double().sum(1) - \
            (torch.rand(60, 16, generator=g) < 0.05 + 0.1 * quality[:, None]).double().sum(1)
        m = torch.full((60,), 16.0, dtype=torch.float64)
        s = RatioSums(60, float(gain.sum()), float(m.sum()), float((gain ** 2).sum()), float((m ** 2).sum()),
                      float((gain * m).sum()))
        low, high = ratio_interval(s, Z)
        covered += low <= 0.15 - (0.05 + 0.1 * 0.6) <= high
    assert covered / trials >= 0.9


@pytest.mark.parametrize("dof, expected", [(1, 12.706204736174698), (2, 4.302652729749464),
                                           (7, 2.3646242515927844), (120, 1.9799304050824413),
                                           (1000, 1.9623390808264074)])
def test_t_quantile_matches_tables(dof, expected):
    assert t_quantile(Z, dof) == pytest.approx(expected, rel=1e-6)


def test_relative_loss_interval_covers_when_a_batch_shares_its_errors():
    """Train-mode outputs of one batch share its batch statistics, so their loss differences move
    together: an interval that treated samples as independent would be far too narrow."""
    g = torch.Generator().manual_seed(4)
    covered, trials, batches, size, truth = 0, 400, 12, 32, 0.2
    for _ in range(trials):
        meter = OutcomeMeter(Task.REGRESSION, torch.device("cpu"))
        for _b in range(batches):
            shared = torch.randn((), generator=g).double() * 0.3     # this batch's statistics' error
            train = 1.0 + torch.rand(size, generator=g).double()
            evaluation = train * (1 + truth + shared) + torch.randn(size, generator=g).double() * 0.05
            meter.add_pair(SampleScores(evaluation, size, None, 0), SampleScores(train, size, None, 0),
                           torch.zeros(size, 1), torch.zeros(size, 1))
        low, high = relative_loss_interval(meter.partial(), Z)
        covered += low <= truth <= high
    assert covered / trials >= 0.92


def test_sequential_z_spends_the_error_rate_over_looks():
    assert sequential_z(1) > Z
    assert sequential_z(100) > sequential_z(10) > sequential_z(1)
    total = sum(2 * (1 - 0.5 * (1 + math.erf(sequential_z(k) / math.sqrt(2)))) for k in range(1, 10_000))
    assert total < 0.05
    assert settles((0.1, 0.3), 0.05) is True and settles((-0.1, 0.04), 0.05) is False
    assert settles((0.0, 0.2), 0.05) is None and settles(None, 0.05) is None


# --------------------------------------------------------------------------- --quick on real models


@pytest.fixture(scope="module")
def many_images():
    return image_data(n=3072, sample_seed=3)


@pytest.fixture(scope="module")
def trained_net():
    x, y = image_data(n=512)
    return train_briefly(make_convnet(), x, y, steps=150)


@pytest.mark.parametrize("broken", [False, True])
def test_quick_gives_the_full_verdict_on_a_fraction_of_the_data(trained_net, many_images, broken):
    import copy

    model = copy.deepcopy(trained_net)
    if broken:
        inject_drift(model.bn2, 4.0)
    full = bncheck.diagnose(model, many_images, device="cpu", batch_size=32)
    quick = bncheck.diagnose(model, many_images, device="cpu", batch_size=32, quick=True)
    assert quick.verdict is full.verdict is (bncheck.Verdict.FAIL if broken else bncheck.Verdict.PASS)
    assert quick.data.stopped_early and quick.data.num_samples <= 1024
    assert quick.data.num_samples >= 256 and quick.data.num_samples_available == 3072
    low, high = quick.gap.accuracy_ci
    assert low <= full.gap.accuracy <= high
    assert not full.data.stopped_early and full.data.num_samples == 3072


def test_every_report_carries_the_gap_interval(trained_net, many_images):
    x, y = many_images
    report = bncheck.diagnose(trained_net, (x[:300], y[:300]), device="cpu")
    low, high = report.gap.accuracy_ci
    assert low <= report.gap.accuracy <= high and report.gate.interval == report.gap.accuracy_ci
    unlabelled = bncheck.diagnose(trained_net, x[:300], device="cpu")
    assert unlabelled.gate.metric == "disagreement" and unlabelled.gap.accuracy_ci is None
    low, high = unlabelled.gate.interval
    assert 0.0 <= low <= unlabelled.gate.value <= high <= 1.0


def test_a_gap_equal_to_the_threshold_passes_despite_rounding():
    from bncheck.gating import gate_of
    from bncheck.outcomes import Outcomes

    # 20 of 20 right in train mode, 19 of 20 in eval mode: 1.0 - 0.95 is 0.050000000000000044 in floats
    sums = {"eval.samples": 20, "eval.correct": 19, "eval.scored": 20,
            "train.samples": 20, "train.correct": 20, "train.scored": 20,
            "acc.n": 20, "acc.t": 20, "acc.e": 19, "acc.te": 19}
    outcomes = Outcomes(sums, batches=1)
    assert 1.0 - 0.95 > 0.05
    gate = gate_of(Task.CLASSIFICATION, outcomes, 0.05)
    assert gate.passed and gate.value == pytest.approx(0.05)
    assert not gate_of(Task.CLASSIFICATION, outcomes, 0.0499).passed
    assert settles((0.02, 0.05 + 1e-15), 0.05) is False  # wholly at or below the threshold
