"""A checkpoint that saved only the trainable variables: BN running statistics are lost.

Seed 003 (TensorFlow batch_norm on MNIST: ~99% with is_training=True, 20% with False). The
net trains fine, but the checkpoint holds only named_parameters(), like a tf.train.Saver over
the trainable variables, so the reloaded model keeps running_mean=0, running_var=1 and
num_batches_tracked=0. bncheck should find high train-mode accuracy, collapsed eval-mode
accuracy, and running stats still at their initial values.
"""
import os
import tempfile

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 100


def make_net():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _split(train):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)  # raw pixel values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    idx = perm[:1400] if train else perm[1400:]
    return x[idx], y[idx]


def _train_and_save(path):
    torch.manual_seed(0)
    x, y = _split(train=True)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    # The bug: only trainable variables go into the checkpoint; BN buffers are left out.
    torch.save({k: v.detach() for k, v in net.named_parameters()}, path)


def build_model():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        _train_and_save(path)
        model = make_net()
        # strict=False silences the "missing keys" error about running_mean/var.
        model.load_state_dict(torch.load(path), strict=False)
    return model  # a freshly built module: train mode, never switched


def get_dataloader():
    x, y = _split(train=False)  # the held-out test split
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
