"""CUDA: the same report as the CPU. These run only where a GPU is visible (they skip elsewhere, CI
included); run them on a GPU machine with ``python -m pytest tests/test_gpu.py``."""
from __future__ import annotations

import copy

import pytest
import torch

import bncheck
from conftest import assert_state_equal, image_data, inject_drift, make_convnet, state_copy, train_briefly

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


@pytest.fixture(scope="module")
def broken():
    x, y = image_data(n=512)
    model = train_briefly(make_convnet(), x, y, steps=120)
    inject_drift(model.bn2, 2.0)
    return model, image_data(n=1024, sample_seed=2)


def test_cuda_and_cpu_agree_to_1e_4(broken):
    model, data = broken
    cpu = bncheck.diagnose(model, data, device="cpu", batch_size=64)
    before = state_copy(model)
    cuda = bncheck.diagnose(model, data, device="cuda", batch_size=64)
    assert_state_equal(model, before)
    assert next(model.parameters()).device.type == "cpu"  # moved for the passes and back
    assert cuda.device.startswith("cuda") and cuda.verdict is cpu.verdict
    for mode in ("eval", "train"):
        a, b = getattr(cuda.metrics, mode), getattr(cpu.metrics, mode)
        assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.accuracy == pytest.approx(b.accuracy, abs=2e-3)
    for a, b in zip(cuda.layers, cpu.layers):
        assert a.name == b.name
        scale = max(b.channels.true_var) ** 0.5
        assert a.channels.true_mean == pytest.approx(b.channels.true_mean, rel=1e-4, abs=1e-4 * scale)
        assert a.channels.true_var == pytest.approx(b.channels.true_var, rel=1e-4)
        assert a.drift == pytest.approx(b.drift, rel=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_and_channels_last_on_cuda(broken, amp):
    model, data = broken
    report = bncheck.diagnose(model, data, device="cuda", batch_size=64, amp=amp, channels_last=True)
    reference = bncheck.diagnose(model, data, device="cuda", batch_size=64)
    assert report.verdict is reference.verdict
    assert report.layers[0].name == reference.layers[0].name == "bn2"


def test_recalibrate_on_cuda_writes_cpu_equal_statistics(broken):
    model, data = broken
    _, on_cpu = bncheck.recalibrate(copy.deepcopy(model), data, device="cpu", return_model=True)
    _, on_cuda = bncheck.recalibrate(copy.deepcopy(model), data, device="cuda", return_model=True)
    for (name, a), (_, b) in zip(on_cuda.state_dict().items(), on_cpu.state_dict().items()):
        torch.testing.assert_close(a.double().cpu(), b.double(), rtol=1e-4, atol=1e-4, msg=name)
