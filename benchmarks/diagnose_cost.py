"""How much a diagnosis costs compared with one eval pass plus one train-mode pass.

    python benchmarks/diagnose_cost.py [--device cpu] [--batches 8] [--batch-size 32] [--size 64]

Target: diagnose() costs little more than the two plain passes it replaces
(the float64 statistics are the overhead).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def timed(fn, device, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import torchvision

    import bncheck

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # time the model, not the CPU's denormal slow path
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).to(device)
    n = args.batches * args.batch_size
    x = torch.randn(n, 3, args.size, args.size)
    y = torch.randint(0, 10, (n,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size)

    def plain(train_bn: bool):
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train(train_bn)
                m.momentum = 0.0 if train_bn else m.momentum
        with torch.no_grad():
            for xb, _ in loader:
                model(xb.to(device))

    # Realistic running statistics first: a random net with 0/1 stats can overflow into
    # denormal floats in eval mode, which times the CPU's slow path rather than bncheck.
    model.train()
    with torch.no_grad():
        for xb, _ in loader:
            model(xb.to(device))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    plain(False)  # warm-up
    eval_s = timed(lambda: plain(False), device)
    train_s = timed(lambda: plain(True), device)
    model.load_state_dict(snapshot)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    diag_s = timed(lambda: bncheck.diagnose(model, loader, device=args.device), device)
    both = eval_s + train_s
    print(f"resnet18 {n} samples of {args.size}x{args.size} on {device}")
    print(f"eval pass {eval_s:.3f} s, train-mode pass {train_s:.3f} s, both {both:.3f} s")
    print(f"diagnose  {diag_s:.3f} s = {diag_s / both:.2f}x the two plain passes")


if __name__ == "__main__":
    main()
