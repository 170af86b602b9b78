"""A correctly trained BatchNorm model: the control case.

An MLP on handwritten digits with default BN momentum (0.1), shuffled batches and enough
updates (12 epochs, 132 steps) for the running statistics to converge. It also has a Dropout
after a BN layer, whose train/eval difference is expected and reported separately. bncheck
should find train-mode and eval-mode accuracy on the held-out split within ~1 point, small
running-stat drift, and nothing to fix.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 128


def _split(train):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    idx = perm[:1400] if train else perm[1400:]
    return x[idx], y[idx]


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(64, 10))
    x, y = _split(train=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(12):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model  # returned in train mode, as the training loop leaves it


def get_dataloader():
    x, y = _split(train=False)  # held-out split of the same distribution
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
