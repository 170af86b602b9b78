"""Recalibration writes exact population statistics, only where asked, and saves atomically."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bncheck
from bncheck.errors import DataError, InputError, NoNormLayersError
from bncheck.frameworks.torch_adapter import TorchModelAdapter
from bncheck.recalibration import RecalibrationResult, save_recalibrated
from conftest import (
    KeepsInEval,
    as_batches,
    assert_state_equal,
    channel_moments,
    collect_norm_inputs,
    image_data,
    inject_drift,
    norm_modules,
    state_copy,
)


def recalibrate(model, data, **options):
    return bncheck.recalibrate(model, data, device="cpu", **options)


def reference_stats(model, batches, mode="norm_train", keep_eval=()):
    """Per layer (mean, unbiased var) of its train-mode input over ``batches``, via our own hooks."""
    return {name: (lambda m: (m[0], m[2]))(channel_moments(x))
            for name, x in collect_norm_inputs(model, batches, mode=mode, keep_eval=keep_eval).items()}


def assert_buffers_equal_reference(model, reference, names):
    for name, module in norm_modules(model):
        if name not in names:
            continue
        mean, var = reference[name]
        torch.testing.assert_close(module.running_mean.double(), mean, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(module.running_var.double(), var, rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture
def broken_convnet(healthy_convnet):
    inject_drift(healthy_convnet.bn2, 3.0)
    with torch.no_grad():
        healthy_convnet.bn3.running_var.mul_(5.0)
    return healthy_convnet


def test_recalibrated_buffers_equal_torch_cat_reference(broken_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    original = state_copy(broken_convnet)
    result, fixed = recalibrate(broken_convnet, batches, return_model=True)
    assert_buffers_equal_reference(fixed, reference_stats(broken_convnet, batches), {"bn1", "bn2", "bn3"})
    assert result.updated_layers == ("bn1", "bn2", "bn3") and result.layers_updated == 3
    assert (result.num_samples, result.num_batches) == (len(x), len(batches))
    # running_mean / running_var replaced, num_batches_tracked counts the batches used, weights kept
    for key, value in fixed.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(value, original[key]), key
        elif key.endswith("num_batches_tracked"):
            assert int(value) == int(original[key]) + len(batches), key
        else:
            assert torch.equal(value, original[key]), key


def test_not_inplace_leaves_the_original_bit_identical(broken_convnet, images):
    broken_convnet.train()
    original = state_copy(broken_convnet)
    flags = [m.training for m in broken_convnet.modules()]
    _, fixed = recalibrate(broken_convnet, images, return_model=True)
    assert fixed is not broken_convnet
    assert_state_equal(broken_convnet, original)
    assert [m.training for m in broken_convnet.modules()] == flags
    assert not torch.equal(fixed.bn2.running_mean, broken_convnet.bn2.running_mean)
    assert fixed.fc.weight.data_ptr() != broken_convnet.fc.weight.data_ptr()  # a real copy
    assert [m.training for m in fixed.modules()] == flags  # the copy keeps the caller's modes
    assert [m.momentum for _, m in norm_modules(fixed)] == [0.1, 0.1, 0.1]


def test_inplace_changes_the_given_model(broken_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    reference = reference_stats(broken_convnet, batches)
    result = recalibrate(broken_convnet, batches, inplace=True)
    assert isinstance(result, RecalibrationResult)
    assert_buffers_equal_reference(broken_convnet, reference, {"bn1", "bn2", "bn3"})
    assert all(not m._forward_pre_hooks for m in broken_convnet.modules())


def test_dropout_stays_off_during_recalibration(healthy_dropout_mlp, blobs):
    x, y = blobs
    batches = as_batches(x, y, 40)
    dropout_off = reference_stats(healthy_dropout_mlp, batches)
    torch.manual_seed(0)
    dropout_on = reference_stats(healthy_dropout_mlp, batches, mode="train")
    # Dropout(0.3) before layer "5" inflates its input variance: the references really differ
    assert (dropout_on["5"][1] / dropout_off["5"][1]).mean() > 1.1
    _, fixed = recalibrate(healthy_dropout_mlp, batches, return_model=True)
    assert_buffers_equal_reference(fixed, dropout_off, {"1", "5"})


def test_frozen_but_training_layers_are_recomputed_by_default(broken_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    for p in broken_convnet.bn2.parameters():
        p.requires_grad_(False)  # frozen, but model.train() still normalises it with batch statistics
    result, fixed = recalibrate(broken_convnet, batches, return_model=True)
    assert result.updated_layers == ("bn1", "bn2", "bn3") and result.kept_layers == ()
    assert_buffers_equal_reference(fixed, reference_stats(broken_convnet, batches), {"bn1", "bn2", "bn3"})


def test_layers_kept_in_eval_by_train_are_kept_unless_included(broken_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    model = KeepsInEval(broken_convnet, "bn2")
    result, fixed = recalibrate(model, batches, return_model=True)
    assert [k.name for k in result.kept_layers] == ["net.bn2"] and result.updated_layers == ("net.bn1", "net.bn3")
    assert "model.train()" in result.kept_layers[0].reason
    assert torch.equal(fixed.net.bn2.running_mean, broken_convnet.bn2.running_mean)
    assert torch.equal(fixed.net.bn2.running_var, broken_convnet.bn2.running_var)
    # bn3 sees bn2's output as it will in eval mode: bn2 normalising with its kept statistics
    kept = reference_stats(broken_convnet, batches, keep_eval=("bn2",))
    assert_buffers_equal_reference(fixed.net, kept, {"bn1", "bn3"})

    reference = reference_stats(broken_convnet, batches)
    result, fixed = recalibrate(model, batches, include_frozen=True, return_model=True)
    assert result.kept_layers == () and result.layers_updated == 3
    assert_buffers_equal_reference(fixed.net, reference, {"bn1", "bn2", "bn3"})


def test_layer_patterns_choose_exactly_the_layers(broken_convnet, images):
    x, y = images
    batches = as_batches(x, y, 32)
    result, fixed = recalibrate(broken_convnet, batches, layers="bn2, bn3", return_model=True)
    assert result.updated_layers == ("bn2", "bn3") and [k.name for k in result.kept_layers] == ["bn1"]
    assert torch.equal(fixed.bn1.running_mean, broken_convnet.bn1.running_mean)
    with pytest.raises(bncheck.InputError, match="matches none"):
        recalibrate(broken_convnet, batches, layers="head.*")


def test_num_samples_and_max_batches_cap_the_work(healthy_convnet, images):
    full = recalibrate(healthy_convnet, images, batch_size=16)
    assert (full.num_samples, full.num_batches) == (len(images[0]), 12)
    capped, fixed = recalibrate(healthy_convnet, images, batch_size=16, num_samples=50, return_model=True)
    assert (capped.num_samples, capped.num_batches) == (50, 4)
    few, _ = recalibrate(healthy_convnet, images, batch_size=16, max_batches=2, return_model=True)
    assert (few.num_samples, few.num_batches) == (32, 2)
    # bn1 sees the data through a fixed conv: a 50-sample subset gives close but different moments
    _, on_all = recalibrate(healthy_convnet, images, batch_size=16, return_model=True)
    assert not torch.equal(fixed.bn1.running_mean, on_all.bn1.running_mean)
    torch.testing.assert_close(fixed.bn1.running_mean, on_all.bn1.running_mean, rtol=0, atol=0.5)


def test_recalibration_repairs_broken_statistics(broken_convnet, images):
    before = bncheck.diagnose(broken_convnet, images, device="cpu")
    assert before.verdict is bncheck.Verdict.FAIL
    result = recalibrate(broken_convnet, images, inplace=True)
    after = bncheck.diagnose(broken_convnet, images, device="cpu")
    assert after.verdict is bncheck.Verdict.PASS
    assert not [f for f in after.findings if f.severity is bncheck.Severity.ERROR]
    assert all(l.drift < 0.05 for l in after.layers)
    assert after.metrics.eval.accuracy >= after.metrics.train.accuracy - 0.01
    assert after.metrics.eval.loss == pytest.approx(after.metrics.train.loss, abs=0.01)
    # train mode ignores running statistics, so it is the same before and after
    assert after.metrics.train == before.metrics.train
    (comparison,) = result.evaluations
    assert comparison.data == "data"
    assert comparison.before.accuracy == pytest.approx(before.metrics.eval.accuracy)
    assert comparison.after.accuracy == pytest.approx(after.metrics.eval.accuracy)
    assert comparison.after.accuracy > comparison.before.accuracy + 0.3


def test_val_data_is_evaluated_before_and_after(broken_convnet, images):
    val = image_data(n=64, sample_seed=1)  # held-out samples of the same task
    result = recalibrate(broken_convnet, images, val_data=val)
    data, val_comparison = result.evaluations
    assert (data.data, val_comparison.data) == ("data", "val-data")
    assert val_comparison.after.accuracy > val_comparison.before.accuracy
    assert val_comparison.after.loss < val_comparison.before.loss


def _val_accuracy(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return right / sum(len(y) for _, y in batches)


@pytest.mark.parametrize("form", ["list of batches", "loader with its own sampler"])
def test_val_data_in_its_own_batches_is_evaluated_as_given(broken_convnet, images, form):
    x, y = image_data(n=64, sample_seed=1)
    batches = as_batches(x, y, 16)
    val = batches if form == "list of batches" else torch.utils.data.DataLoader(
        TensorDataset(x, y), batch_size=16, sampler=list(range(64)))
    before = _val_accuracy(broken_convnet, batches)
    result, fixed = recalibrate(broken_convnet, images, val_data=val, batch_size=32, return_model=True)
    comparison = result.evaluations[1]
    assert comparison.before.accuracy == pytest.approx(before)
    assert comparison.after.accuracy == pytest.approx(_val_accuracy(fixed, batches))
    assert comparison.before.num_samples == comparison.after.num_samples == 64


def test_one_shot_val_data_is_refused_before_any_work(broken_convnet, images):
    x, y = image_data(n=64, sample_seed=1)
    state = state_copy(broken_convnet)
    with pytest.raises(DataError, match="val-data.*one-shot generator"):
        recalibrate(broken_convnet, images, val_data=(b for b in as_batches(x, y, 16)), inplace=True)
    assert_state_equal(broken_convnet, state)


def test_recalibrating_a_model_without_norm_layers_is_refused(blobs):
    with pytest.raises(NoNormLayersError):
        recalibrate(nn.Sequential(nn.Linear(8, 3)), blobs)


def test_recalibrate_writes_unbiased_variance(blobs):
    # one BN on the raw data, two uneven batches: running_var = unbiased population variance
    x, y = blobs
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
    batches = [(x[:7], y[:7]), (x[7:20], y[7:20])]
    recalibrate(model, batches, inplace=True)
    data = x[:20].double()
    torch.testing.assert_close(model[0].running_mean.double(), data.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), data.var(0, unbiased=True), rtol=1e-6, atol=1e-6)
    # an equal-weight average of batch means (update_bn) would not match: the batches are uneven
    batch_average = (x[:7].double().mean(0) + x[7:20].double().mean(0)) / 2
    assert not torch.allclose(model[0].running_mean.double(), batch_average, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- saving


def test_save_recalibrated_writes_the_state_dict(broken_convnet, images, tmp_path):
    result, fixed = recalibrate(broken_convnet, images, return_model=True)
    path = tmp_path / "fixed.pt"
    saved = save_recalibrated(fixed, path, result)
    assert saved.output_path == str(path) and result.output_path is None
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == fixed.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in fixed.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt"]


def test_save_recalibrated_is_atomic_when_saving_fails(broken_convnet, images, tmp_path, monkeypatch):
    result, fixed = recalibrate(broken_convnet, images, return_model=True)

    def failing_save(self, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(TorchModelAdapter, "save", failing_save)
    path = tmp_path / "fixed.pt"
    with pytest.raises(InputError, match="cannot write .*fixed.pt: disk full"):
        save_recalibrated(fixed, path, result)
    assert list(tmp_path.iterdir()) == []

    # an existing file at the destination is left as it was
    path.write_bytes(b"previous checkpoint")
    with pytest.raises(InputError, match="cannot write .*fixed.pt: disk full"):
        save_recalibrated(fixed, path, result)
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["fixed.pt"]


def test_dataset_and_given_batches_recalibrate_the_first_layer_identically(healthy_convnet, images):
    # bn1's input does not depend on how the data is batched: any batching gives the same moments
    x, y = images
    original = state_copy(healthy_convnet)
    _, from_dataset = recalibrate(healthy_convnet, TensorDataset(x, y), batch_size=24, return_model=True)
    _, from_batches = recalibrate(healthy_convnet, as_batches(x, y, 50), return_model=True)
    torch.testing.assert_close(from_dataset.bn1.running_mean, from_batches.bn1.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_dataset.bn1.running_var, from_batches.bn1.running_var, rtol=1e-6, atol=1e-6)
    # later layers see train-mode outputs of earlier ones, which do depend on the batching
    assert not torch.allclose(from_dataset.bn3.running_var, from_batches.bn3.running_var, rtol=1e-6, atol=1e-6)
    assert_state_equal(healthy_convnet, original)
