"""A small ResNet overfits three images: 100% in training, 33% in eval on the same images.

Seeds 000/001 (Keras ResNet50 fit on 3 images for 5 epochs). BatchNorm uses Keras' default
momentum 0.99 (PyTorch momentum=0.01): after 10 updates the running mean/var still weigh
their 0/1 initial values at 0.99**10 = 90%. bncheck should find train-mode accuracy 100%,
eval-mode accuracy 33% (all three images get the same class), running stats barely moved.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MOMENTUM = 0.01  # Keras BatchNormalization(momentum=0.99)
STEPS = 10


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=MOMENTUM)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, momentum=MOMENTUM))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16, momentum=MOMENTUM), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def _images():
    # One real handwritten 0, 1 and 2, upsampled to 32x32 RGB with raw pixel values
    # (0..255, like the PIL images in the story), labels 0, 1, 2.
    d = load_digits()
    idx = [int((d.target == c).nonzero()[0][0]) for c in range(3)]
    x = torch.tensor(d.images[idx], dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x, torch.arange(3)


def build_model():
    torch.manual_seed(0)
    x, y = _images()
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(STEPS):  # full batch of 3, like model.fit(imgs, y, epochs=...)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model  # returned in train mode, as the training loop leaves it


def get_dataloader():
    x, y = _images()
    return DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
