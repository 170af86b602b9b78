"""stats-not-converged is judged from the statistics, not from the update counter alone.

The two wrong results that came from reading only ``num_batches_tracked``: exact statistics recomputed
over a few batches were called unconverged on shifted data, and ``inspect`` warned on every
recalibrated checkpoint. A counter of 0 beside trained statistics is a lost counter.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bncheck
from bncheck.convergence import counter_blend_ratio, weight_left_at_init
from bncheck.report import Severity
from conftest import image_data, make_convnet, norm_modules, train_briefly


def codes(report) -> dict:
    return {f.code: f for f in report.findings}


@pytest.fixture(scope="module")
def trained(images_module):
    x, y = images_module
    return train_briefly(make_convnet(), x, y, steps=120)


@pytest.fixture(scope="module")
def images_module():
    return image_data()


def recomputed_by_update_bn(model, x, batches=8):
    """``torch.optim.swa_utils.update_bn`` over a few batches: exact statistics, a counter of ``batches``."""
    model = copy.deepcopy(model)
    update_bn(list(x.split(len(x) // batches)), model)
    assert {int(bn.num_batches_tracked) for _, bn in norm_modules(model)} == {batches}
    return model


def test_resnet18_update_bn_then_shifted_data_is_not_unconverged():
    """The sweep's case: resnet18, momentum 0.1, update_bn over 8 batches, diagnosed on shifted data."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g) * 2 + 1
    y = torch.randint(0, 4, (64,), generator=g)
    update_bn(list(x.split(8)), model)
    # The counter says 0.9^8 = 43% on 0/1; the statistics are the exact statistics of x.
    report = bncheck.diagnose(model, (x * 1.5 + 2.0, y), device="cpu", batch_size=16)
    found = codes(report)
    assert "stats-not-converged" not in found
    # A per-channel rescaling of the input: only the first layer is off, the data is preprocessed differently.
    assert found["preprocessing-shift"].layers == ("bn1",)
    stem = next(l for l in report.layers if l.name == "bn1")
    assert weight_left_at_init(stem) < 0.5 and counter_blend_ratio(stem) > 0.5
    assert "stats-not-converged" not in codes(bncheck.inspect(model))


def test_recomputed_statistics_on_other_data_are_a_mismatch(trained, images_module):
    x, y = images_module
    model = recomputed_by_update_bn(trained, x)
    # Other data of another scale and offset (new templates): the first layer and a later one drift.
    other_x, other_y = image_data(seed=3)
    report = bncheck.diagnose(model, (other_x * 4 - 3, other_y), device="cpu", max_gap=0.0)
    found = codes(report)
    assert not report.passed and "stats-not-converged" not in found
    assert found["stats-mismatch"].severity is Severity.ERROR and "preprocessing-shift" not in found
    # a resize-like change of the same data moves the first layer alone: a preprocessing shift
    resized = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    found = codes(bncheck.diagnose(model, (resized, y), device="cpu"))
    assert set(found) == {"preprocessing-shift"} and found["preprocessing-shift"].layers == ("bn1",)
    # on the data it was recomputed on, nothing at all
    assert bncheck.diagnose(model, (x, y), device="cpu").findings == ()


def _reset_then_updated(trained, x, momentum: float = 0.1):
    """A copy whose running statistics were reset, then updated by train-mode batches of 32 of ``x``."""
    model = copy.deepcopy(trained)
    for _, bn in norm_modules(model):
        bn.reset_running_stats()
        bn.momentum = momentum
    model.train()
    with torch.no_grad():
        for xb in x.split(32):
            model(xb)
    return model


def test_genuinely_unconverged_statistics_are_still_found(trained, images_module):
    x, y = images_module
    model = _reset_then_updated(trained, x[:96])  # three updates with momentum 0.1: 73% still on 0/1
    report = bncheck.diagnose(model, (x, y), device="cpu")
    f = codes(report)["stats-not-converged"]
    assert f.severity is Severity.ERROR and f.evidence["judged_by"] == "values"
    assert f.evidence["initial_weight"] == pytest.approx(0.729, abs=0.1)
    assert "measured against the data's statistics" in f.message
    # momentum 0.1 is already the default: the fix is to train longer, not to change it
    assert f.fix.startswith("Train for more steps") and "default momentum" not in f.fix
    assert str(report.verdict) == "fail"  # print(report.verdict) reads as the JSON does


def test_a_momentum_below_the_default_is_named_in_the_fix(trained, images_module):
    x, y = images_module
    model = _reset_then_updated(trained, x[:320], momentum=0.01)  # ten updates: 90% still on 0/1
    f = codes(bncheck.diagnose(model, (x, y), device="cpu"))["stats-not-converged"]
    assert "Use the default momentum" in f.fix


@pytest.mark.parametrize("how", ["update_bn", "bncheck"])
def test_inspect_does_not_warn_on_a_recalibrated_healthy_checkpoint(trained, images_module, how):
    x, y = images_module
    if how == "update_bn":
        model = recomputed_by_update_bn(trained, x)
    else:
        broken = copy.deepcopy(trained)
        for _, bn in norm_modules(broken):
            bn.reset_running_stats()
        model = bncheck.recalibrate(broken, (x, y), device="cpu", return_model=True)[1]
    report = bncheck.inspect(model)
    assert report.passed
    assert not [f for f in report.findings if f.severity in (Severity.ERROR, Severity.WARNING)]


def test_inspect_says_the_counter_alone_speaks_when_values_fit_it(trained, images_module):
    x, _ = images_module
    model = copy.deepcopy(trained)
    for _, bn in norm_modules(model):
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x[:32])  # one update: 90% still on 0/1, and every variance above the 0.9 floor
    f = codes(bncheck.inspect(model))["stats-not-converged"]
    assert f.severity is Severity.INFO and f.evidence["judged_by"] == "counter"
    assert f.message.startswith("By the update counter alone")


def test_a_lost_counter_is_not_never_updated(trained, images_module):
    model = copy.deepcopy(trained)
    for _, bn in norm_modules(model):
        bn.num_batches_tracked.zero_()  # e.g. a checkpoint saved before the counter existed
    for report in (bncheck.inspect(model), bncheck.diagnose(model, images_module, device="cpu")):
        found = codes(report)
        assert "stats-never-updated" not in found and "stats-not-converged" not in found
        assert found["update-counter-lost"].severity is Severity.INFO
        assert set(found["update-counter-lost"].layers) == {"bn1", "bn2", "bn3"}
    assert bncheck.inspect(model).passed and bncheck.diagnose(model, images_module, device="cpu").passed


def test_momentum_zero_reads_as_momentum_none_meant(images_module):
    x, y = images_module
    torch.manual_seed(0)
    model = make_convnet()
    for _, bn in norm_modules(model):
        bn.momentum = 0.0  # meant: momentum=None, a cumulative average
    train_briefly(model, x, y, steps=60, settle=10)
    assert all(int(bn.num_batches_tracked) > 0 for _, bn in norm_modules(model))
    f = codes(bncheck.diagnose(model, (x, y), device="cpu"))["stats-never-updated"]
    assert "momentum=0" in f.message and "momentum=None" in f.message
    assert f.evidence["momentum_zero_layers"] == 3
    # near miss: momentum=0 set after training froze trained statistics: nothing wrong
    healthy = train_briefly(make_convnet(), x, y, steps=120)
    for _, bn in norm_modules(healthy):
        bn.momentum = 0.0
    assert "stats-never-updated" not in codes(bncheck.diagnose(healthy, (x, y), device="cpu"))


def test_cli_inspect_on_bncheck_recalibrate_output_has_no_warning(tmp_path):
    from click.testing import CliRunner

    from bncheck.cli import main

    (tmp_path / "model.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))\n"
        "def get_dataloader():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return (torch.randn(64, 3, 8, 8, generator=g) * 3 + 1, torch.randint(0, 3, (64,), generator=g))\n")
    runner = CliRunner()
    model_py, fixed = str(tmp_path / "model.py"), tmp_path / "fixed.pt"
    assert runner.invoke(main, ["inspect", model_py]).exit_code == 1  # fresh: statistics never updated
    result = runner.invoke(main, ["recalibrate", model_py, "-o", str(fixed), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["inspect", model_py, "--checkpoint", str(fixed), "--format", "json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)["findings"]
    assert [f for f in findings if f["severity"] in ("error", "warning")] == []
