"""Real architectures the sweep found defects in: torchvision's MNASNet (module versions in the
state_dict's metadata), detection models (a list of per-image dicts), a plain state_dict into a
DataParallel model, and GoogLeNet's auxiliary heads, which run only in training."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bncheck
from bncheck.cli import EXIT_ERROR, main

torchvision = pytest.importorskip("torchvision")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def images_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "images.pt"
    torch.save((torch.randn(16, 3, 32, 32, generator=g) * 2 + 1, torch.randint(0, 4, (16,), generator=g)), path)
    return path


# --------------------------------------------------------------------------- MNASNet


@pytest.mark.parametrize("layout", ["state_dict", "dict_copy", "safetensors"])
def test_mnasnet_checkpoints_load(tmp_path, images_file, layout):
    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(weights=None, num_classes=4)
    path = tmp_path / ("mnas.safetensors" if layout == "safetensors" else "mnas.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    elif layout == "dict_copy":
        torch.save({"state_dict": dict(model.state_dict()), "epoch": 1}, path)
    else:
        torch.save(model.state_dict(), path)
    result = run_cli("diagnose", "torchvision:mnasnet0_5", "--num-classes", 4, "--checkpoint", path,
                     "--data", images_file, "--batch-size", 8, "--format", "json")
    assert result.exit_code != EXIT_ERROR, result.output
    assert len(json.loads(result.stdout)["layers"]) == 52


def test_mnasnet_recalibrated_output_loads_back(tmp_path, images_file):
    fixed = tmp_path / "fixed.pt"
    result = run_cli("recalibrate", "torchvision:mnasnet0_5", "--num-classes", 4, "--data", images_file,
                     "--batch-size", 8, "-o", fixed, "--quiet")
    assert result.exit_code == 0, result.output
    result = run_cli("inspect", "torchvision:mnasnet0_5", "--num-classes", 4, "--checkpoint", fixed,
                     "--format", "json")
    assert result.exit_code == 0, result.output
    assert "stats-never-updated" not in {f["code"] for f in json.loads(result.stdout)["findings"]}


# --------------------------------------------------------------------------- detection models

DETECTION_MODEL = '''
import torch
import torchvision


def build_model():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    return model{suffix}


def get_dataloader():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 64, 64, generator=g)
'''


@pytest.mark.parametrize("options", [[], ["--output-key", "scores"], ["--output-index", "0"]])
def test_detection_model_gets_one_plain_answer(tmp_path, options):
    (tmp_path / "model.py").write_text(DETECTION_MODEL.format(suffix=""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_cli("diagnose", tmp_path / "model.py", "--batch-size", 4, *options)
    assert result.exit_code == EXIT_ERROR
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "list of 4 dicts (boxes, labels, scores), one per image" in message
    assert "backbone" in message and "no --output-key or --output-index applies" in message


def test_detection_backbone_is_diagnosed_label_free(tmp_path):
    (tmp_path / "model.py").write_text(DETECTION_MODEL.format(suffix=".backbone"))
    result = run_cli("diagnose", tmp_path / "model.py", "--batch-size", 4, "--output-key", "0", "--format", "json")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["task"] == "label-free" and len(report["layers"]) > 30


# --------------------------------------------------------------------------- DataParallel


def test_plain_state_dict_into_a_data_parallel_model(tmp_path, images_file):
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(weights=None, num_classes=4)
    with torch.no_grad():
        trained.bn1.running_mean.fill_(0.25)  # distinctive values that must arrive
    torch.save(trained.state_dict(), tmp_path / "plain.pt")
    (tmp_path / "model.py").write_text(
        "import torch, torchvision\n"
        "def build_model():\n"
        "    return torch.nn.DataParallel(torchvision.models.resnet18(weights=None, num_classes=4))\n")
    result = run_cli("inspect", tmp_path / "model.py", "--checkpoint", tmp_path / "plain.pt", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any("lacked the model's prefix 'module.'" in note for note in report["notes"])
    assert not [note for note in report["notes"] if "lacks" in note]  # every key found its place
    result = run_cli("diagnose", tmp_path / "model.py", "--checkpoint", tmp_path / "plain.pt", "--data",
                     images_file, "--batch-size", 8, "--format", "json")
    assert result.exit_code in (0, 1), result.output


# --------------------------------------------------------------------------- auxiliary heads


def test_googlenet_aux_heads_are_measured_or_named(images_file):
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=4)
    aux = {name for name, m in model.named_modules() if name.startswith("aux") and isinstance(m, nn.BatchNorm2d)}
    assert aux == {"aux1.conv.bn", "aux2.conv.bn"}
    report = bncheck.diagnose(model, torch.load(images_file), device="cpu", batch_size=8)
    measured = {l.name for l in report.layers if l.drift is not None}
    named = {name for name in aux for note in report.notes if name in note and "never ran" in note}
    assert aux <= measured | named
    assert measured | named == {l.name for l in report.layers}


# --------------------------------------------------------------------------- norm layers outside torch.nn's classes


def test_frozen_batchnorm_layers_are_reported_and_cannot_cause_a_gap(images_file):
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4, norm_layer=FrozenBatchNorm2d)
    report = bncheck.diagnose(model, torch.load(images_file), device="cpu", batch_size=8)
    assert len(report.layers) == 20 and all(not l.batch_stats_in_train for l in report.layers)
    assert report.passed and report.agreement == 1.0  # the same statistics in both modes
    assert all(l.drift is not None for l in report.layers)


def test_a_scripted_model_is_read_or_refused_plainly(images_file):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, and still in use
        scripted = torch.jit.script(torchvision.models.resnet18(weights=None, num_classes=4))
    try:
        report = bncheck.diagnose(scripted, torch.load(images_file), device="cpu", batch_size=8)
    except bncheck.InputError as error:
        assert "TorchScript" in str(error) and "eager" in str(error)
    else:
        assert len(report.layers) == 20


def test_evonorm_layers_with_running_statistics_are_not_ignored(images_file):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18d", pretrained=False, num_classes=4, norm_layer=timm.layers.EvoNorm2dB0)
    report = bncheck.diagnose(model, torch.load(images_file), device="cpu", batch_size=8)
    assert any("EvoNorm" in l.type for l in report.layers) or any("EvoNorm" in n for n in report.notes)
