"""How the engine runs a model: kernel statistics, the model's own train(), precision and memory
format, and norm layers outside torch.nn's classes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.stats import InputStatsAccumulator
from conftest import (
    KeepsInEval,
    blob_data,
    assert_state_equal,
    assert_stats_close,
    channel_moments,
    collect_norm_inputs,
    image_data,
    layer_named,
    make_convnet,
    norm_modules,
    state_copy,
    train_briefly,
)


def diagnose(model, data, **options):
    return bncheck.diagnose(model, data, device="cpu", **options)


@pytest.fixture
def trained(healthy_convnet, images):
    """The suite's trained ConvNet (a fresh copy per test) and its images."""
    return healthy_convnet, images


# --------------------------------------------------------------------------- statistics from the kernel


def test_batchnorm_statistics_come_from_its_kernel_not_from_a_float64_copy(trained, monkeypatch):
    model, data = trained
    calls = {"input": 0, "kernel": 0}
    add, add_batch_stats = InputStatsAccumulator.add, InputStatsAccumulator.add_batch_stats

    def counting_add(self, x):
        calls["input"] += 1
        return add(self, x)

    def counting_kernel(self, *args):
        calls["kernel"] += 1
        return add_batch_stats(self, *args)

    monkeypatch.setattr(InputStatsAccumulator, "add", counting_add)
    monkeypatch.setattr(InputStatsAccumulator, "add_batch_stats", counting_kernel)
    report = diagnose(model, data, batch_size=16)
    assert calls == {"input": 0, "kernel": 3 * 12}  # three layers, twelve batches
    reference = collect_norm_inputs(model, list(bncheck.batches.plan_batches(data, batch_size=16).batches))
    for name in ("bn1", "bn2", "bn3"):
        mean, var, unbiased = channel_moments(reference[name])
        channels = layer_named(report, name).channels
        assert_stats_close(channels.true_mean, mean, var.sqrt())
        assert_stats_close(channels.true_var_unbiased, unbiased)


def test_the_kernel_writes_every_batch_after_the_first_straight_into_the_accumulator(trained, monkeypatch):
    """No copy per layer and batch: from the second batch on, the buffers a BatchNorm ran on are the
    row its accumulator offered."""
    model, data = trained
    written_in_place = []
    add_batch_stats = InputStatsAccumulator.add_batch_stats

    def watching(self, count, mean, unbiased_var):
        offered = self._rows[len(self._pending_counts)] if self._rows else (None, None)
        written_in_place.append(mean is offered[0] and unbiased_var is offered[1])
        return add_batch_stats(self, count, mean, unbiased_var)

    monkeypatch.setattr(InputStatsAccumulator, "add_batch_stats", watching)
    before = {name: (bn.running_mean, bn.running_mean.clone()) for name, bn in norm_modules(model)}
    report = diagnose(model, data, batch_size=16)
    assert len(written_in_place) == 3 * 12 and sum(written_in_place) == 3 * 11
    reference = collect_norm_inputs(model, list(bncheck.batches.plan_batches(data, batch_size=16).batches))
    for name in ("bn1", "bn2", "bn3"):
        mean, var, unbiased = channel_moments(reference[name])
        assert_stats_close(layer_named(report, name).channels.true_mean, mean, var.sqrt())
        assert_stats_close(layer_named(report, name).channels.true_var_unbiased, unbiased)
    # the model keeps its own buffers, unchanged
    for name, bn in norm_modules(model):
        assert bn.running_mean is before[name][0] and torch.equal(bn.running_mean, before[name][1])


@pytest.mark.parametrize("batch_size", [7, 16, 50])
def test_any_batch_size_gives_the_same_input_statistics_of_the_first_layer(trained, batch_size):
    model, data = trained  # bn1 sees the data through a fixed conv: batching cannot change its moments
    report = diagnose(model, data, batch_size=batch_size)
    mean, var, _ = channel_moments(collect_norm_inputs(model, [data])["bn1"])
    assert_stats_close(layer_named(report, "bn1").channels.true_mean, mean, var.sqrt())
    assert_stats_close(layer_named(report, "bn1").channels.true_var, var)


def test_channels_last_reads_the_inputs_exactly_and_restores_the_memory_format(trained):
    model, data = trained
    model = copy.deepcopy(model)
    before = state_copy(model)
    default = diagnose(model, data)
    report = diagnose(model, data, channels_last=True)
    assert_state_equal(model, before)
    assert all(p.is_contiguous() for p in model.parameters())
    for a, b in zip(report.layers, default.layers):
        assert a.name == b.name and a.drift == pytest.approx(b.drift, rel=1e-5, abs=1e-7)
    assert report.metrics.eval.loss == pytest.approx(default.metrics.eval.loss, rel=1e-5)


def test_bf16_autocast_keeps_statistics_exact_for_what_the_layers_see(trained):
    model, data = trained
    report = diagnose(model, data, amp="bf16", batch_size=32)
    seen: dict[str, list[torch.Tensor]] = {}
    clone = copy.deepcopy(model).eval()
    for _, bn in norm_modules(clone):
        bn.train()
        bn.momentum = 0.0
    hooks = [bn.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].double()))
             for name, bn in norm_modules(clone)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for xb, _ in bncheck.batches.plan_batches(data, batch_size=32).batches:
            clone(xb)
    for hook in hooks:
        hook.remove()
    for name in ("bn2", "bn3"):
        assert seen[name][0].dtype == torch.float64
        mean, var, _ = channel_moments(torch.cat(seen[name]))
        assert_stats_close(layer_named(report, name).channels.true_mean, mean, var.sqrt())
        assert_stats_close(layer_named(report, name).channels.true_var, var)
    assert report.metrics.eval.accuracy == pytest.approx(diagnose(model, data).metrics.eval.accuracy, abs=0.05)


def test_bf16_buffers_are_read_from_the_input_in_float64(trained):
    model, data = trained
    half = copy.deepcopy(model).to(torch.bfloat16)
    x, y = data
    report = diagnose(half, (x.to(torch.bfloat16), y), batch_size=32)
    plan = bncheck.batches.plan_batches((x.to(torch.bfloat16), y), batch_size=32)
    inputs = collect_norm_inputs(half, list(plan.batches))
    mean, var, _ = channel_moments(inputs["bn2"])
    torch.testing.assert_close(torch.tensor(layer_named(report, "bn2").channels.true_mean, dtype=torch.float64),
                               mean, rtol=1e-9, atol=1e-9)  # float64 sums of the inputs: exact


# --------------------------------------------------------------------------- the model's own train()


class WithStochasticDepth(nn.Module):
    """A residual block with torchvision's StochasticDepth and a Dropout head."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.depth = StochasticDepth(0.5, "row")
        self.bn_after = nn.BatchNorm2d(3)
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(3, 3)

    def forward(self, x):
        x = self.bn_after(x + self.depth(F.relu(self.bn(self.conv(x)))))
        return self.fc(self.drop(x.mean((2, 3))))


def test_train_mode_is_model_train_with_dropout_and_stochastic_depth_off():
    x, y = image_data()
    model = train_briefly(WithStochasticDepth(), x, y, steps=80)
    report = diagnose(model, (x, y), batch_size=32)
    clone = copy.deepcopy(model).train()
    clone.depth.eval()
    clone.drop.eval()
    for _, bn in norm_modules(clone):
        bn.momentum = 0.0
    correct = 0
    with torch.no_grad():
        for xb, yb in bncheck.batches.plan_batches((x, y), batch_size=32).batches:
            correct += int((clone(xb).argmax(1) == yb).sum())
    assert report.metrics.train.accuracy == pytest.approx(correct / len(y), abs=1e-12)
    assert report.metrics.train_with_dropout is not None and report.metrics.train_with_dropout.num_samples == 32


class ReactsToItsMode(nn.Module):
    """A block whose own __setattr__ watches its training flag: bncheck must set the flag through it."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)
        self.__dict__["flags_set"] = []

    def __setattr__(self, name, value):
        if name == "training" and "flags_set" in self.__dict__:
            self.flags_set.append(value)
        super().__setattr__(name, value)

    def forward(self, x):
        return self.bn(x)


def test_a_module_with_its_own_setattr_sees_every_mode_switch():
    x, y = blob_data()
    block = ReactsToItsMode()
    model = nn.Sequential(nn.Linear(8, 8), block, nn.ReLU(), nn.Linear(8, 3))
    model = train_briefly(model, x, y, steps=40).eval()
    block.flags_set.clear()
    diagnose(model, (x, y), batch_size=48)
    # Once by the adapter's own model.train(), then before each of the five batches' train forward.
    assert block.flags_set.count(True) >= 6
    assert block.flags_set[-1] is False and not block.training  # the model's eval mode, restored


def test_layers_an_overridden_train_keeps_in_eval_use_their_running_statistics(trained):
    model, data = trained
    wrapped = KeepsInEval(copy.deepcopy(model), "bn1", "bn2")
    report = diagnose(wrapped, data, batch_size=32)
    modes = {l.name: l.batch_stats_in_train for l in report.layers}
    assert modes == {"net.bn1": False, "net.bn2": False, "net.bn3": True}
    clone = copy.deepcopy(wrapped).train()
    clone.net.bn3.momentum = 0.0
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(clone(xb), yb, reduction="sum"))
                   for xb, yb in bncheck.batches.plan_batches(data, batch_size=32).batches)
    assert report.metrics.train.loss == pytest.approx(loss / len(data[1]), rel=1e-6)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in wrapped.modules())


# --------------------------------------------------------------------------- other norm layers


def test_frozen_batchnorm_is_measured_and_cannot_cause_a_gap():
    from torchvision.models import resnet18
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=3, norm_layer=FrozenBatchNorm2d)
    x, y = image_data(n=48, size=32)
    report = diagnose(model, (x, y), batch_size=16)
    assert len(report.layers) == 20 and {l.type for l in report.layers} == {"FrozenBatchNorm2d"}
    assert all(not l.batch_stats_in_train and l.drift is not None for l in report.layers)
    assert report.gap.accuracy == 0.0 and report.passed  # the same statistics in both modes
    with pytest.raises(bncheck.InputError, match="--include-frozen"):
        bncheck.recalibrate(model, (x, y), device="cpu", batch_size=16)
    result, fixed = bncheck.recalibrate(model, (x, y), device="cpu", batch_size=16, include_frozen=True,
                                        return_model=True)
    assert result.layers_updated == 20
    after = sorted(l.drift for l in diagnose(fixed, (x, y), batch_size=16).layers)
    before = sorted(l.drift for l in report.layers)
    # exact up to PreciseBN's usual approximation (upstream layers normalised per batch of 16 while
    # measuring), which the deepest, 1x1-pixel layers feel most
    assert after[10] < 0.02 and after[-1] < 0.2 and before[0] > 0.5


def test_evonorm_with_running_variance_is_recognised_and_its_gap_reported():
    from timm.layers import EvoNorm2dB0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), EvoNorm2dB0(8, momentum=0.01), nn.Conv2d(8, 8, 3),
                          EvoNorm2dB0(8, momentum=0.01), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    x, y = image_data(n=192)
    x = x * 20 + 3  # far from the running variance's initial 1, which momentum 0.01 leaves behind slowly
    train_briefly(model, x, y, steps=60, settle=0)
    report = diagnose(model, (x, y), batch_size=32)
    assert sorted(l.type for l in report.layers) == ["EvoNorm2dB0", "EvoNorm2dB0"]
    assert all(l.drift is not None and l.mean_shift_max == 0 for l in report.layers)  # variance only
    assert report.metrics.train.accuracy > report.metrics.eval.accuracy + 0.1 and not report.passed


def test_torchscript_is_refused_with_what_to_pass_instead(trained):
    model, data = trained
    with pytest.raises(bncheck.InputError, match="TorchScript.*eager"):
        diagnose(torch.jit.script(copy.deepcopy(model)), data)


def test_data_parallel_and_compile_wrappers_are_measured_through_the_module(trained):
    model, data = trained
    plain = diagnose(model, data)
    wrapped = diagnose(nn.DataParallel(model), data)
    assert [l.name for l in wrapped.layers] == [l.name for l in plain.layers]
    assert wrapped.metrics == plain.metrics
