"""The model zoo: every torchvision classification model with BatchNorm, and a representative subset of
timm's, built with random weights (``weights=None`` / ``pretrained=False``) and diagnosed at a small
input size. Marked ``slow``; ``python -m pytest -m "not slow"`` leaves it out.

Each model gets one seeded batch of ``SAMPLES`` smooth random images (mean and variance away from
0/1) and, all on that batch:

* freshly built, its statistics are at their reset values 0/1: ``stats-never-updated``;
* after ``bncheck.recalibrate`` the statistics are exact: every measured layer's drift is under 1e-3,
  no finding is an error and none blames the statistics (or eval-mode batch dependence), and the
  verdict passes or its failure is explained as train mode's (``gap-from-train-mode``). Random-weight
  networks are chaotic in train mode: even with a single batch that holds all the data, Bessel's
  correction alone (train mode normalises with the biased variance) moves their near-tied logits, so
  a strict pass would be luck; a trained network does not behave so.

Input sizes are 32 px, larger only where an architecture needs it (``TORCHVISION_SIZES``,
``TIMM_SIZES``); Inception v3 runs at 299 px so that its auxiliary head can run in train mode. The
timm subset (``TIMM_MODELS``) is the smallest model, by parameter count, of each timm model module
that has BatchNorm, plus the smallest of further families inside the large modules (EfficientNet's
MixNet, MnasNet, FBNet, ...; ResNet's SE/ResNeXt/ResNet-D variants; ByobNet's RepVGG, MobileOne, ...);
all of timm (743 BatchNorm models in timm 1.0.31) would take an estimated hour. The whole zoo (58
torchvision and 84 timm models) took 348 s on one CPU thread of the 2-core development machine.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _NormBase

import bncheck
from bncheck.report import Severity

torchvision = pytest.importorskip("torchvision")

SAMPLES = 8           # one batch: train-mode batch statistics are then the population statistics
SIZE = 32
DRIFT_EXACT = 1e-3    # recalibrated on the very batch it is diagnosed on
STATISTICS_CODES = {"stats-never-updated", "stats-not-converged", "stats-mismatch", "stats-corrupt",
                    "preprocessing-shift", "averaged-weights-stale-stats", "frozen-bn-in-train-mode",
                    "stats-dominated-by-recent-batches", "batch-dependent-eval", "unexplained-gap"}

TORCHVISION_MODELS = (
    "densenet121", "densenet161", "densenet169", "densenet201",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "wide_resnet101_2", "wide_resnet50_2",
)
# torchvision classification models without BatchNorm (LayerNorm transformers, plain VGG, ...).
TORCHVISION_WITHOUT_BATCHNORM = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t",
    "vgg11", "vgg13", "vgg16", "vgg19", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32",
)
TORCHVISION_SIZES = {"inception_v3": 299, "maxvit_t": 64}
TORCHVISION_SAMPLES = {"inception_v3": 4}  # 299 px is costly: half a batch

TIMM_MODELS = (
    # the smallest BatchNorm model of each timm module
    "lambda_resnet26t", "mobileone_s1", "convmixer_768_32", "cpubone_nano", "cs3darknet_focus_s", "cspnext_tiny",
    "densenet121", "dla46x_c", "dpn48b", "efficientformer_l1", "efficientformerv2_s0", "mobilenetv2_035",
    "efficientvim_m1", "efficientvit_b0", "efficientvit_m0", "fasternet_t0", "fastvit_t8", "ghostnet_050",
    "hardcorenas_b", "hgnetv2_b0", "hrnet_w18_small", "iformer_t", "inception_next_atto", "inception_resnet_v2",
    "inception_v3", "inception_v4", "lcnetv2_small", "levit_128s", "lowformer_b0", "maxvit_pico_rw_256",
    "lcnet_035", "mobilevit_xxs", "nasnetalarge", "nextvit_small", "pnasnet5large", "regnetx_002",
    "repghostnet_050", "repvit_m1", "res2next50", "resnest14d", "resnet10t", "resnetv2_18", "rexnet_100",
    "selecsls42", "legacy_seresnet18", "shvit_s1", "skresnet18", "starnet_s050", "swiftformer_xs",
    "tiny_vit_5m_224", "tresnet_m", "vgg11_bn", "visformer_tiny", "vit_small_resnet50d_s16_224", "volo_d1_224",
    "ese_vovnet19b_slim_dw", "legacy_xception", "xception41p", "xcit_nano_12_p8_224",
    # further families inside the large modules
    "mixnet_s", "tf_mixnet_s", "mnasnet_small", "fbnetc_100", "spnasnet_100", "tinynet_e", "efficientnetv2_rw_t",
    "efficientnet_b0", "fbnetv3_b", "mobilenetv3_small_050", "seresnet18", "resnet18d", "resnext26ts",
    "repvgg_a0", "gernet_s", "regnetz_b16", "regnety_002", "cspresnet50", "ghostnetv3_050", "rexnetr_100",
    "mobilevitv2_050", "coatnet_pico_rw_224", "test_resnet", "test_efficientnet", "test_byobnet",
)
# Larger inputs where an architecture needs them; fixed-size models are built for 64 px with img_size.
TIMM_SIZES = {"inception_resnet_v2": 128, "inception_v3": 128, "inception_v4": 128, "ghostnetv3_050": 64}
TIMM_IMG_SIZE = {"efficientformerv2_s0", "efficientvit_m0", "levit_128s", "maxvit_pico_rw_256",
                 "swiftformer_xs", "visformer_tiny", "vit_small_resnet50d_s16_224", "volo_d1_224",
                 "xcit_nano_12_p8_224", "coatnet_pico_rw_224"}
TIMM_NATIVE_SIZE = {"efficientformer_l1": 224}


def zoo_images(size: int, n: int = SAMPLES, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-resolution noise, upsampled, plus fine noise), shifted away from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, max(size // 8, 2), max(size // 8, 2), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.3 * torch.randn(n, 3, size, size, generator=g)) * 1.5 + 0.8


def build_torchvision(name: str):
    torch.manual_seed(0)
    if name == "maxvit_t":
        # maxvit_t's 7x7 partitions need 224 px; its configuration with 2x2 partitions runs at 64 px.
        from torchvision.models.maxvit import MaxVit

        return MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                      block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2, num_classes=4)
    return torchvision.models.get_model(name, weights=None, num_classes=4)


def build_timm(name: str):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    extra = {"img_size": 64} if name in TIMM_IMG_SIZE else {}
    return timm.create_model(name, pretrained=False, num_classes=4, **extra)


def timm_size(name: str) -> int:
    if name in TIMM_IMG_SIZE:
        return 64
    return TIMM_NATIVE_SIZE.get(name, TIMM_SIZES.get(name, SIZE))


def check_zoo_model(model, size: int, samples: int = SAMPLES) -> None:
    assert any(isinstance(m, _NormBase) for m in model.modules()), "no BatchNorm: take the model off the zoo list"
    x = zoo_images(size, samples)
    fresh = bncheck.diagnose(model, x, device="cpu", batch_size=samples)
    never = [f for f in fresh.findings if f.code == "stats-never-updated"]
    assert never and never[0].severity is Severity.ERROR, fresh.findings
    bncheck.recalibrate(model, x, device="cpu", batch_size=samples, inplace=True)
    healthy = bncheck.diagnose(model, x, device="cpu", batch_size=samples)
    measured = [l for l in healthy.layers if l.drift is not None]
    assert measured and max(l.drift for l in measured) < DRIFT_EXACT
    assert not [f for f in healthy.findings if f.severity is Severity.ERROR], healthy.findings
    assert not {f.code for f in healthy.findings} & STATISTICS_CODES, healthy.findings
    assert healthy.passed or "gap-from-train-mode" in {f.code for f in healthy.findings}, healthy.findings
    # every norm layer was measured, or the report says that some never ran (auxiliary heads)
    if any(l.drift is None for l in healthy.layers):
        assert any("never ran" in note for note in healthy.notes), healthy.notes


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_zoo(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet/Inception's note on their weight init
        model = build_torchvision(name)
    check_zoo_model(model, TORCHVISION_SIZES.get(name, SIZE), TORCHVISION_SAMPLES.get(name, SAMPLES))


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_zoo(name):
    check_zoo_model(build_timm(name), timm_size(name))


def test_the_torchvision_zoo_covers_every_classification_model_with_batchnorm():
    """Cheap, and not slow: a new torchvision model must be sorted into one of the two lists."""
    available = set(torchvision.models.list_models(module=torchvision.models))
    listed = set(TORCHVISION_MODELS) | set(TORCHVISION_WITHOUT_BATCHNORM)
    assert available - listed == set(), "new torchvision models: add them to TORCHVISION_MODELS or _WITHOUT_BATCHNORM"
    assert set(TORCHVISION_MODELS) <= available and not set(TORCHVISION_MODELS) & set(TORCHVISION_WITHOUT_BATCHNORM)


def test_the_timm_zoo_names_exist():
    timm = pytest.importorskip("timm")
    assert [name for name in TIMM_MODELS if not timm.is_model(name)] == []
    assert len(set(TIMM_MODELS)) == len(TIMM_MODELS)
