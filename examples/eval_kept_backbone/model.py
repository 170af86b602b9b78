"""Fine-tuning done right: the frozen backbone's BatchNorm stays in eval mode during training.

The counterpart of frozen_backbone_finetune. A backbone is pretrained on domain A (digits as
scanned), then frozen, and a new head with its own BatchNorm is trained on domain B (a scanner
with 2x contrast and +1 brightness). The model's train() keeps the backbone's BatchNorm layers
in eval mode, as mmdetection's norm_eval, fastai's BnFreeze and Lightning's BaseFinetuning do:
training normalises them with their pretrained running statistics, exactly as eval mode does.

bncheck measures the mode the model trained in (its own model.train(), dropout off): it passes,
and `bncheck recalibrate` recomputes only the head's BatchNorm. torch.optim.swa_utils.update_bn
would reset the backbone's statistics too and leave them at 0/1, since train() keeps those
layers from updating.
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
    return x[1000:] * 2.0 + 1.0, y[1000:]


class FineTuned(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.backbone.modules():  # the frozen backbone normalises with its pretrained statistics
            if isinstance(m, nn.BatchNorm1d):
                m.eval()
        return self

    def forward(self, x):
        return self.head(self.backbone(x))


def _fit(model, params, x, y, epochs, seed):
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def build_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                             nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU())
    pretrained = nn.Sequential(backbone, nn.Linear(64, 10))
    _fit(pretrained, pretrained.parameters(), *_domain_a(), epochs=8, seed=1)

    for p in backbone.parameters():
        p.requires_grad = False
    model = FineTuned(backbone)
    _fit(model, model.head.parameters(), *_domain_b(), epochs=15, seed=2)
    return model


def get_dataloader():
    x, y = _domain_b()
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
