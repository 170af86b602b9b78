"""Transfer learning with a frozen BatchNorm backbone, Keras-2 style: good in training, bad in eval.

Seed 002 (Keras fine-tuning with frozen layers). A backbone is pretrained on domain A (digits
as scanned, pixels in [0, 1]), then frozen and a new head is fitted on domain B (same kind of
digits from a scanner with 2x contrast and +1 brightness). As in Keras 2, frozen BN layers
normalise with batch statistics while training but never update their moving statistics, so
they stay at domain-A values. bncheck should find high train-mode and much lower eval-mode
accuracy on domain B, with the frozen layers' running stats far from the batch stats.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 100


def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _domain_a():
    x, y = _digits()
    return x[:1000], y[:1000]


def _domain_b():
    x, y = _digits()
    return x[1000:] * 2.0 + 1.0, y[1000:]  # the new scanner: contrast x2, brightness +1


def _fit(model, params, x, y, epochs, seed):
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()  # Keras fit(): the whole model, frozen BN layers included, in training phase
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def build_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                             nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU())
    # Pretraining on domain A (stands in for the downloaded ImageNet weights).
    pretrained = nn.Sequential(backbone, nn.Linear(64, 10))
    _fit(pretrained, pretrained.parameters(), *_domain_a(), epochs=8, seed=1)

    # Fine-tuning on domain B: freeze the backbone, train a new head.
    for p in backbone.parameters():
        p.requires_grad = False
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = 0.0  # Keras 2 trainable=False: moving mean/var are not updated
    model = nn.Sequential(backbone, nn.Linear(64, 10))
    _fit(model, model[1].parameters(), *_domain_b(), epochs=8, seed=2)
    return model  # returned in train mode, as the fine-tuning loop leaves it


def get_dataloader():
    x, y = _domain_b()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
