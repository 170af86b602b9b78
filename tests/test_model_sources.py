"""Named model specs: random weights only, and never a download."""
from __future__ import annotations

import socket
import sys
import urllib.request

import pytest
import torch
from torch import nn

from bncheck.errors import BackendError, InputError
from bncheck.loading.model_sources import build_named_model, is_named_model_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("torchvision:resnet18", True),
        ("timm:resnet50.a1_in1k", True),
        ("torchvision:", True),  # a known source: building it says the name is missing
        ("keras:resnet", False),
        ("model.py", False),
        ("checkpoints/run:1.pt", False),
    ],
)
def test_is_named_model_spec(text, expected):
    assert is_named_model_spec(text) is expected


def test_torchvision_resnet18_with_num_classes():
    torch.manual_seed(0)
    model = build_named_model("torchvision:resnet18", num_classes=10)
    assert isinstance(model, nn.Module)
    assert model.fc.out_features == 10
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_default_head_size_is_kept():
    model = build_named_model("torchvision:mobilenet_v3_small")
    assert model.classifier[-1].out_features == 1000


def test_nothing_is_downloaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    model = build_named_model("torchvision:resnet18", num_classes=10)
    # Random init, not pretrained: the BN buffers are fresh.
    assert torch.equal(model.bn1.running_mean, torch.zeros(64))
    assert int(model.bn1.num_batches_tracked) == 0


def test_unknown_torchvision_name_suggests_close_matches():
    with pytest.raises(InputError) as info:
        build_named_model("torchvision:resnet181")
    message = str(info.value)
    assert message.startswith("unknown torchvision model 'resnet181'; did you mean ")
    assert "torchvision:resnet18" in message


def test_unknown_name_without_close_match_gives_examples():
    with pytest.raises(InputError, match=r"unknown torchvision model 'zzzzqqq'; \d+ models are available, e.g. "):
        build_named_model("torchvision:zzzzqqq")


def test_detection_models_are_not_classification_specs():
    with pytest.raises(InputError, match="unknown torchvision model 'fasterrcnn_resnet50_fpn'"):
        build_named_model("torchvision:fasterrcnn_resnet50_fpn")


def test_bad_spec_and_bad_num_classes():
    with pytest.raises(InputError) as info:
        build_named_model("keras:resnet50")
    assert str(info.value) == "model spec 'keras:resnet50': expected torchvision:NAME or timm:NAME"
    with pytest.raises(InputError, match="num_classes must be at least 1, got 0"):
        build_named_model("torchvision:resnet18", num_classes=0)


def test_missing_timm_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(BackendError) as info:
        build_named_model("timm:resnet18")
    assert str(info.value) == "timm:NAME models need timm; pip install timm"


def test_missing_torchvision_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(BackendError, match="pip install torchvision"):
        build_named_model("torchvision:resnet18")


def test_named_model_without_a_name():
    with pytest.raises(InputError, match="names no model; use e.g. torchvision:resnet18"):
        build_named_model("torchvision:")
