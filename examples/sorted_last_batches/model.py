"""Running statistics that only remember the last few batches, and those batches are sorted.

Seed 004 (PyTorch ResNet whose eval accuracy swings while train-mode accuracy is stable).
BN momentum is 0.9, Keras' value ported as-is (PyTorch keeps only 10% of the old average per
update). Training is fine, but it ends with a pass that re-runs the training set to refresh the
statistics, over data stored sorted by label and not shuffled: the running mean/var end up
describing the last class only. bncheck should find train-mode accuracy clearly above
eval-mode accuracy, and running stats far from the statistics of the (shuffled) data.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MOMENTUM = 0.9  # Keras BatchNormalization(momentum=0.9) means PyTorch momentum=0.1
BATCH = 128


def _data():
    d = load_digits()
    order = torch.tensor(d.target).argsort(stable=True)  # the files are stored class by class
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)[order] / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)[order]


def _net():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256), nn.BatchNorm1d(256, momentum=MOMENTUM), nn.ReLU(),
        nn.Linear(256, 128), nn.BatchNorm1d(128, momentum=MOMENTUM), nn.ReLU(),
        nn.Linear(128, 10))


def build_model():
    torch.manual_seed(0)
    x, y = _data()
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    in_order = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    model.train()
    for _ in range(4):
        for xb, yb in shuffled:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    # "Re-run the training set to refresh BN statistics" -- but in stored (sorted) order.
    with torch.no_grad():
        for xb, _ in in_order:
            model(xb)
    return model  # returned in train mode, as the loop leaves it


def get_dataloader():
    x, y = _data()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(2))
