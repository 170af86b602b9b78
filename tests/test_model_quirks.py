"""Models that do unusual things in forward or train(): each once gave a wrong diagnosis or changed
the caller's state. Every test compares with a reference computed by hand on real tensors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.batches import plan_batches
from bncheck.errors import DataError, ForwardError
from bncheck.stats import InputStatsAccumulator
from conftest import (
    ConvNet,
    assert_state_equal,
    assert_stats_close,
    channel_moments,
    collect_norm_inputs,
    layer_named,
    state_copy,
)


def diagnose(model, data, **options):
    return bncheck.diagnose(model, data, device="cpu", **options)


@pytest.fixture
def trained(healthy_convnet, images):
    """The suite's trained ConvNet (a fresh copy per test) and its images."""
    return healthy_convnet, images


def _reference_accuracies(model, data, batch_size: int):
    """Eval-mode and train-mode (BN on batch statistics, momentum 0) accuracy, by hand."""
    clone = copy.deepcopy(model)
    plan = plan_batches(data, batch_size=batch_size)
    right = {"eval": 0, "train": 0}
    total = 0
    with torch.no_grad():
        for xb, yb in plan.batches:
            clone.eval()
            right["eval"] += int((clone(xb.clone()).argmax(1) == yb).sum())
            for m in clone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.momentum = 0.0
            right["train"] += int((clone(xb.clone()).argmax(1) == yb).sum())
            total += len(yb)
    return right["eval"] / total, right["train"] / total


# --------------------------------------------------------------------------- forwards with side effects


class OneOutputBuffer(nn.Module):
    """Writes every output into the same tensor, as some exported or optimised models do."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.out = None

    def forward(self, x):
        y = self.net(x)
        if self.out is None or self.out.shape != y.shape:
            self.out = torch.empty_like(y)
        return self.out.copy_(y)


class ScalesItsInput(nn.Module):
    """Normalises its input in place before the network (x.sub_().div_())."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        x.sub_(0.5).div_(1.5)
        return self.net(x)


def _with_drift(model):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.bn2.running_mean += 2.0
    return broken


def test_a_model_reusing_one_output_buffer_is_scored_per_mode(trained):
    model, data = trained
    broken = _with_drift(model)
    expected_eval, expected_train = _reference_accuracies(broken, data, 32)
    assert expected_train - expected_eval > 0.2  # the drift is a real gap
    report = diagnose(OneOutputBuffer(broken), data, batch_size=32)
    assert report.metrics.eval.accuracy == pytest.approx(expected_eval)
    assert report.metrics.train.accuracy == pytest.approx(expected_train)
    assert not report.passed


def test_a_forward_that_changes_its_input_sees_every_batch_as_loaded(trained):
    model, (x, y) = trained
    net = _with_drift(model)
    wrapped = ScalesItsInput(copy.deepcopy(net))
    x_before = x.clone()
    report = diagnose(wrapped, (x, y), batch_size=32)
    assert torch.equal(x, x_before)  # the caller's tensors are not changed either
    expected_eval, expected_train = _reference_accuracies(ScalesItsInput(copy.deepcopy(net)), (x, y), 32)
    assert report.metrics.eval.accuracy == pytest.approx(expected_eval)
    assert report.metrics.train.accuracy == pytest.approx(expected_train)
    mean, var, _ = channel_moments(collect_norm_inputs(net, [((x - 0.5) / 1.5, y)])["bn1"])
    assert_stats_close(layer_named(report, "net.bn1").channels.true_mean, mean, var.sqrt())


def test_a_forward_that_leaves_its_input_alone_is_not_copied_after_the_first_batch(trained, monkeypatch):
    model, data = trained
    clones = []
    original = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        if self.dim() == 4 and self.shape[1] == 3:
            clones.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    diagnose(model, data, batch_size=32)
    assert clones == [32, 32]  # batch 0, once per mode; no copy of the inputs after it


# --------------------------------------------------------------------------- dropout called as a function


class FunctionalHead(nn.Module):
    """timm's heads and torchvision's DenseNet call F.dropout(x, p, training=self.training): no
    dropout module to put in eval."""

    def __init__(self, net: ConvNet, p: float = 0.9):
        super().__init__()
        self.net, self.p = net, p

    def forward(self, x):
        net = self.net
        h = F.relu(net.bn1(net.conv1(x)))
        h = F.dropout(h, self.p, training=self.training)  # before bn2: it would change its statistics
        h = F.relu(net.bn2(net.conv2(h)))
        h = F.relu(net.bn3(net.conv3(h)))
        return net.fc(net.pool(h).flatten(1))


def test_functional_dropout_is_off_in_the_train_mode_pass(trained):
    model, data = trained
    wrapped = FunctionalHead(copy.deepcopy(model))
    report = diagnose(wrapped, data, batch_size=32)
    # With dropout off, the functional model is the plain model: the same statistics and verdict.
    plain = diagnose(model, data, batch_size=32)
    for name in ("bn1", "bn2", "bn3"):
        assert_stats_close(layer_named(report, f"net.{name}").channels.true_var,
                           torch.tensor(layer_named(plain, name).channels.true_var))
    assert report.metrics.train.accuracy == pytest.approx(plain.metrics.train.accuracy)
    assert report.passed == plain.passed


def test_functional_dropout_is_off_in_the_recalibration_pass(trained):
    model, (x, y) = trained
    wrapped = FunctionalHead(copy.deepcopy(model))
    result, fixed = bncheck.recalibrate(wrapped, (x, y), device="cpu", batch_size=32, return_model=True)
    batches = list(plan_batches((x, y), batch_size=32).batches)
    mean, var, unbiased = channel_moments(collect_norm_inputs(model, batches)["bn2"])
    assert_stats_close(fixed.net.bn2.running_var, unbiased)


def test_attention_dropout_is_off_in_the_train_mode_pass():
    torch.manual_seed(0)

    class AttentionThenNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, dropout=0.9, batch_first=True)
            self.norm = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h, _ = self.attention(x, x, x, need_weights=False)
            q = h.transpose(1, 2)
            q = F.scaled_dot_product_attention(q, q, q, dropout_p=0.9 if self.training else 0.0).transpose(1, 2)
            return self.head(self.norm((h + q).mean(1)))

    model = AttentionThenNorm()
    x = torch.randn(64, 5, 8)
    y = torch.randint(0, 3, (64,))
    report = diagnose(model, (x, y), batch_size=64)
    clone = copy.deepcopy(model).eval()
    seen = []
    clone.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].double()))
    with torch.no_grad():
        clone(x)
    _, var, _ = channel_moments(seen[0])
    assert_stats_close(layer_named(report, "norm").channels.true_var, var)


# --------------------------------------------------------------------------- BatchNorm subclasses


class FixedMomentumBatchNorm(nn.BatchNorm2d):
    """A subclass whose forward passes its own momentum to the kernel, not self.momentum."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.1, self.eps)


def test_a_batchnorm_subclass_with_its_own_forward_is_read_from_its_input(trained, monkeypatch):
    model, data = trained
    custom = copy.deepcopy(model)
    replacement = FixedMomentumBatchNorm(8)
    replacement.load_state_dict(custom.bn2.state_dict())
    custom.bn2 = replacement
    kernel_calls = []
    add_batch_stats = InputStatsAccumulator.add_batch_stats
    monkeypatch.setattr(InputStatsAccumulator, "add_batch_stats",
                        lambda self, *a: (kernel_calls.append(1), add_batch_stats(self, *a))[1])
    report = diagnose(custom, data, batch_size=32)
    batches = list(plan_batches(data, batch_size=32).batches)
    mean, var, unbiased = channel_moments(collect_norm_inputs(model, batches)["bn2"])
    assert_stats_close(layer_named(report, "bn2").channels.true_mean, mean, var.sqrt())
    assert_stats_close(layer_named(report, "bn2").channels.true_var_unbiased, unbiased)
    assert len(kernel_calls) == 2 * 6  # bn1 and bn3 from the kernel, six batches each


def test_a_layer_whose_mean_is_far_from_zero_is_read_exactly(trained):
    model, (x, y) = trained
    far = copy.deepcopy(model)
    with torch.no_grad():
        far.conv2.bias += 500.0  # bn2's input mean is then hundreds of its standard deviations
        far.bn2.running_mean += 500.0
    report = diagnose(far, (x, y), batch_size=32)
    batches = list(plan_batches((x, y), batch_size=32).batches)
    mean, var, unbiased = channel_moments(collect_norm_inputs(far, batches)["bn2"])
    assert (mean.abs() / var.sqrt()).min() > 100
    # exact against the spread, not only against the mean's own size
    torch.testing.assert_close(torch.tensor(layer_named(report, "bn2").channels.true_mean, dtype=torch.float64),
                               mean, rtol=0, atol=1e-6 * float(var.sqrt().min()))
    assert_stats_close(layer_named(report, "bn2").channels.true_var_unbiased, unbiased)


class ReadsItsRunningVar(nn.Module):
    """Scales by its BatchNorm's running variance in forward, as QAT's fused ConvBn scales its weights."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.seen.append(self.inner.bn3.running_var.clone())
        return out * self.inner.bn3.running_var.mean().rsqrt()


def test_a_forward_that_reads_running_statistics_in_training_sees_the_models_own(trained):
    model, (x, y) = trained
    wrapped = ReadsItsRunningVar(copy.deepcopy(model))
    own = wrapped.inner.bn3.running_var.clone()
    report = diagnose(wrapped, (x, y), batch_size=16)
    assert len(wrapped.seen) == len(x) // 16   # every train-mode forward, as under model.train()
    assert all(torch.equal(seen, own) for seen in wrapped.seen)
    mean, var, unbiased = channel_moments(collect_norm_inputs(model, list(plan_batches((x, y), batch_size=16)
                                                                          .batches))["bn3"])
    assert_stats_close(layer_named(report, "inner.bn3").channels.true_var_unbiased, unbiased)
    assert report.passed


class InferenceModeForward(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @torch.inference_mode()
    def forward(self, x):
        return self.inner(x)


def test_a_forward_under_inference_mode_over_more_batches_than_one_merge_holds(trained):
    model, (x, y) = trained
    data = (x[:140], y[:140])   # 70 batches of 2: 64 kernel rows merged at once, then 6 more
    report = diagnose(InferenceModeForward(copy.deepcopy(model)), data, batch_size=2)
    batches = list(plan_batches(data, batch_size=2).batches)
    reference = collect_norm_inputs(model, batches)
    for name in ("bn1", "bn2", "bn3"):
        mean, var, unbiased = channel_moments(reference[name])
        channels = layer_named(report, f"inner.{name}").channels
        assert_stats_close(channels.true_mean, mean, var.sqrt())
        assert_stats_close(channels.true_var_unbiased, unbiased)


def test_syncbatchnorm_in_a_one_process_group_runs_on_the_cpu(trained, tmp_path):
    import torch.distributed as dist

    model, data = trained
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        report = diagnose(synced, data, batch_size=32)
    finally:
        dist.destroy_process_group()
    plain = diagnose(model, data, batch_size=32)
    assert "forward" not in synced.bn2.__dict__  # the plain forward was only lent for the passes
    assert report.metrics.train.accuracy == pytest.approx(plain.metrics.train.accuracy)
    for a, b in zip(report.layers, plain.layers):
        assert a.drift == pytest.approx(b.drift, rel=1e-6)


# --------------------------------------------------------------------------- what the caller keeps


class FreezesInTrain(nn.Module):
    """A train() that also sets requires_grad=False on the backbone (a fine-tuning recipe)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        super().train(mode)
        for p in self.net.conv1.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, x):
        return self.net(x)


def test_requires_grad_changed_by_the_models_train_is_put_back(trained):
    model, data = trained
    wrapped = FreezesInTrain(copy.deepcopy(model))
    before = [p.requires_grad for p in wrapped.parameters()]
    diagnose(wrapped, data, batch_size=32)
    assert [p.requires_grad for p in wrapped.parameters()] == before


class AddsNoise(nn.Module):
    """Draws from the global generator in every forward (noise injection, random erasing)."""

    def forward(self, x):
        return x + 0.01 * torch.randn_like(x)


def test_the_callers_random_state_is_the_same_after_a_diagnosis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), AddsNoise(), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    diagnose(model, (x, y), batch_size=16)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- sys.exit in user code


class ExitsInForward(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        raise SystemExit(3)


class ExitsInDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index == 5:
            raise SystemExit(0)
        return torch.randn(3, 8, 8), 0


def test_sys_exit_in_forward_is_a_forward_error(trained):
    model, data = trained
    state = state_copy(model)
    with pytest.raises(ForwardError, match=r"sys.exit\(3\)"):
        diagnose(ExitsInForward(model), data)
    assert_state_equal(model, state)


def test_sys_exit_in_a_dataset_is_a_data_error(trained):
    model, _ = trained
    loader = torch.utils.data.DataLoader(ExitsInDataset(), batch_size=4, sampler=list(range(8)))
    with pytest.raises(DataError, match=r"cannot load batch 1: it called sys.exit\(0\)"):
        diagnose(model, loader)


def test_sys_exit_in_loss_fn_is_a_forward_error(trained):
    model, data = trained

    def loss_fn(outputs, targets):
        raise SystemExit(1)

    with pytest.raises(ForwardError, match=r"loss_fn raised"):
        diagnose(model, data, loss_fn=loss_fn)
