"""A tiny LightningModule and its seeded data, shared by the Lightning callback tests and the
DDP script they run (tests/lightning_ddp_fit.py)."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import image_data


class LitConvNet(pl.LightningModule):
    """Two conv + BatchNorm2d blocks; Adam with a cosine schedule over ``max_epochs``, so the
    weights settle and the running statistics (momentum 0.1) catch up by the last epoch."""

    def __init__(self, momentum: float, lr: float = 1e-2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)]


def loaders(train: int = 256, val: int = 128, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Training batches shuffled by the global RNG (which LitConvNet seeds), so that a callback that moved
    the random stream would change the run; validation samples drawn anew from the same task. Shifted by
    +2, so that the first layer's statistics sit clearly away from the running averages' 0/1 start."""
    x, y = image_data(n=train, seed=0)
    x_val, y_val = image_data(n=val, seed=0, sample_seed=1)
    return (DataLoader(TensorDataset(x + 2.0, y), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x_val + 2.0, y_val), batch_size=batch_size))


def trainer(max_epochs: int, callbacks: list, **options) -> pl.Trainer:
    options = {"logger": False, **options}
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, **options)
