"""timm models by name, including timm's own BatchNormAct2d (a BatchNorm2d subclass)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bncheck.cli import main

timm = pytest.importorskip("timm")


@pytest.fixture
def data_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "data.pt"
    torch.save((torch.randn(16, 3, 32, 32, generator=generator) * 2 + 1,
                torch.randint(0, 4, (16,), generator=generator)), path)
    return path


def test_timm_model_by_name_is_built_without_weights_and_diagnosed(data_file):
    result = CliRunner().invoke(main, ["diagnose", "timm:resnet18", "--num-classes", "4", "--data", str(data_file),
                                       "--batch-size", "8", "--format", "json"])
    report = json.loads(result.stdout)
    assert result.exit_code in (0, 1)
    assert len(report["layers"]) == 20
    # A fresh timm model has never updated its statistics, and the data is far from N(0, 1).
    assert "stats-never-updated" in {f["code"] for f in report["findings"]}
    assert any("random weights" in note for note in report["notes"])


def test_timm_batchnormact_layers_are_found_and_restored(data_file):
    import bncheck

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.load(data_file)
    report = bncheck.diagnose(model, (x, y), batch_size=8, device="cpu")
    assert {layer.type for layer in report.layers} == {"BatchNormAct2d"}
    assert len(report.layers) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
