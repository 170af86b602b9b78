"""Shared tiny models and seeded data for the engine tests.

Everything here is small enough to train in well under a second on a CPU. The
data deliberately has a non-zero mean and a non-unit variance, so running
statistics left at their initial values (0 and 1) are measurably wrong.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

CLASSES = 3

# Tiny models run fastest single-threaded; on a busy 2-core machine intra-op threads
# spin against each other and make a 0.1 s training loop take 10 s. BNCHECK_TEST_THREADS
# runs the suite at another thread count (it must pass at 1 and at 2).
torch.set_num_threads(int(os.environ.get("BNCHECK_TEST_THREADS", "1")))


# --------------------------------------------------------------------------- data


def blob_data(n: int = 240, features: int = 8, classes: int = CLASSES, seed: int = 0,
              scale: float = 2.0, offset: float = 1.5):
    """Gaussian class clusters, shifted and scaled away from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return x * scale + offset, y


def image_data(n: int = 192, channels: int = 3, size: int = 8, classes: int = CLASSES, seed: int = 0,
               sample_seed: int | None = None):
    """Per-class image templates plus noise, shifted and scaled away from N(0, 1).
    ``sample_seed`` draws new samples of the same task (templates come from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, channels, size, size, generator=g)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 0.8 * torch.randn(n, channels, size, size, generator=g)
    return x * 1.5 + 0.5, y


def as_batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> list:
    """Ready-made batches in order: bncheck uses an iterable of batches as given."""
    if y is None:
        return list(x.split(batch_size))
    return list(zip(x.split(batch_size), y.split(batch_size)))


def readme_python_block(needle: str) -> str:
    """The README's ```python example that contains ``needle``, so tests can run it as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [block.split("```")[0] for block in text.split("```python\n")[1:]]
    return next(block for block in blocks if needle in block)


# --------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """Three conv + BatchNorm2d blocks and a linear head; ``bn2`` is the middle layer."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(width)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(width * 4, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def make_mlp(dropout: str = "none", p: float = 0.5, features: int = 8, hidden: int = 16,
             classes: int = CLASSES, seed: int = 0) -> nn.Sequential:
    """Linear-BN-ReLU twice and a head. ``dropout``: "none", "before_bn" (before the
    second BatchNorm1d, index 4) or "after_last_bn" (before the head only)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
    if dropout == "before_bn":
        layers.append(nn.Dropout(p))
    layers += [nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
    if dropout == "after_last_bn":
        layers.append(nn.Dropout(p))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def make_convnet(seed: int = 0, **kwargs) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**kwargs)


class KeepsInEval(nn.Module):
    """The fine-tuning idiom mmdetection calls norm_eval: train() keeps the named norm layers of
    ``net`` in eval mode, so training normalises them with their running statistics."""

    def __init__(self, net: nn.Module, *names: str):
        super().__init__()
        self.net, self.kept = net, names

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.kept:
            self.net.get_submodule(name).eval()
        return self

    def forward(self, x):
        return self.net(x)


def layer_named(report, name: str):
    return next(layer for layer in report.layers if layer.name == name)


def norm_modules(model: nn.Module) -> list[tuple[str, _NormBase]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _NormBase)]


# --------------------------------------------------------------------------- training


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150,
                  batch_size: int = 32, lr: float = 1e-2, seed: int = 0, settle: int = 40,
                  loss_fn=F.cross_entropy) -> nn.Module:
    """Adam on shuffled mini-batches, then ``settle`` no-grad train-mode passes so the
    running statistics catch up with the final weights (as the last epochs of a
    real run do with a decayed learning rate). Leaves the model in train mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        for _ in range(settle):
            model(x[torch.randperm(len(x), generator=g)[:batch_size]])
    return model


def inject_drift(bn: _NormBase, shift: float = 3.0) -> None:
    """The canonical injected fault: ``running_mean += shift`` on one layer."""
    with torch.no_grad():
        bn.running_mean += shift


def set_norm_train(model: nn.Module, momentum: float | None = 0.0) -> nn.Module:
    """Model in eval mode (dropout off) with only the norm layers normalising with
    batch statistics; momentum 0 keeps the running statistics fixed."""
    model.eval()
    for _, m in norm_modules(model):
        m.train()
        m.momentum = momentum
    return model


def collect_norm_inputs(model: nn.Module, batches: list, *, mode: str = "norm_train",
                        keep_eval: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every norm layer's inputs over ``batches``, concatenated (float64), collected with
    our own forward pre-hooks on a deep copy. ``mode``: "norm_train" (only norm layers in
    train mode, except those named in ``keep_eval``), "train" (``model.train()``, dropout on)
    or "eval"."""
    clone = copy.deepcopy(model)
    if mode == "norm_train":
        set_norm_train(clone)
        for name, m in norm_modules(clone):
            if name in keep_eval:
                m.eval()
    elif mode == "train":
        clone.train()
        for _, m in norm_modules(clone):
            m.momentum = 0.0
    else:
        clone.eval()
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in norm_modules(clone)}
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().double()))
               for name, m in norm_modules(clone)]
    try:
        with torch.no_grad():
            for batch in batches:
                clone(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(parts) for name, parts in seen.items() if parts}


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference (mean, biased var, unbiased var) over every dim but 1, in float64."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False), flat.var(1, unbiased=True)


# BatchNorm's own kernel reports each batch's statistics in float32 (the CPU sums in float64, then
# rounds): the engine's merged statistics are exact to this, relative to the data's spread.
STATS_RTOL = 1e-6


def assert_stats_close(actual, expected: torch.Tensor, spread: torch.Tensor | None = None) -> None:
    """Within 1e-6 relative of a float64 reference, and of the spread for values near zero."""
    expected = expected.double()
    actual = torch.as_tensor(actual, dtype=torch.float64)
    scale = expected.abs().max() if spread is None else spread.double().max()
    torch.testing.assert_close(actual, expected, rtol=STATS_RTOL, atol=STATS_RTOL * float(scale))


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def blobs():
    return blob_data()


@pytest.fixture(scope="session")
def images():
    return image_data()


@pytest.fixture(scope="session")
def _trained_convnet(images):
    x, y = images
    return train_briefly(make_convnet(), x, y, steps=120)


@pytest.fixture(scope="session")
def _trained_mlp(blobs):
    x, y = blobs
    return train_briefly(make_mlp(), x, y)


@pytest.fixture(scope="session")
def _trained_dropout_mlp(blobs):
    x, y = blobs
    return train_briefly(make_mlp("before_bn", p=0.3), x, y)


@pytest.fixture
def healthy_convnet(_trained_convnet):
    """A trained ConvNet with converged statistics (a fresh copy per test)."""
    return copy.deepcopy(_trained_convnet)


@pytest.fixture
def healthy_mlp(_trained_mlp):
    return copy.deepcopy(_trained_mlp)


@pytest.fixture
def healthy_dropout_mlp(_trained_dropout_mlp):
    """A trained MLP with Dropout(0.3) before its second BatchNorm1d."""
    return copy.deepcopy(_trained_dropout_mlp)


# --------------------------------------------------------------------------- model.py files

# An untrained model.py for the CLI tests whose subject is not the statistics (files, errors): it loads fast.
LIGHT_MODEL = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 4, generator=g) * 2 + 5, torch.arange(64) % 3

dataset = torch.utils.data.TensorDataset(*_data())
"""


def write_light_model(folder, name: str = "model.py", extra: str = ""):
    import textwrap

    path = folder / name
    path.write_text(LIGHT_MODEL + textwrap.dedent(extra))
    return path


# --------------------------------------------------------------------------- golden files


def pytest_addoption(parser):
    parser.addoption("--overwrite-goldens", action="store_true", default=False,
                     help="Rewrite tests/golden/* from the current renderers instead of comparing.")


@pytest.fixture
def overwrite_goldens(request) -> bool:
    return request.config.getoption("--overwrite-goldens")
