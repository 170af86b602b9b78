"""What ``--quick`` saves: the same verdict on a fraction of the data.

    python benchmarks/quick_cost.py [--samples 16384] [--batch-size 64] [--repeats 3]

A small CNN, trained briefly on 16,384 synthetic 3x32x32 images, is diagnosed in-process on all
of them and with ``quick=True``: once healthy (a gap near 0 points) and once with one layer's
running mean shifted (a gap near 60 points). Printed: each run's verdict, samples used, wall
time (best of ``--repeats``), the quick/full time ratio, and whether quick's 95% interval contains
the full run's gap.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 1.5 * torch.randn(n, 3, 32, 32, generator=g) + 0.5, y


def small_cnn() -> nn.Module:
    torch.manual_seed(0)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.Flatten(), nn.Linear(32 * 16, 10))


def train(model: nn.Module, x, y, steps: int = 300) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        for idx in torch.randperm(len(y), generator=g)[:64 * 50].split(64):
            model(x[idx])  # running statistics settle on the final weights
    return model


def best_of(repeats: int, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    import bncheck

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x, y = data(args.samples)
    healthy = train(small_cnn(), x, y)
    broken = copy.deepcopy(healthy)
    with torch.no_grad():
        broken[1].running_mean += 2.0  # the first BatchNorm: a gap of about 60 points
    print(f"{args.samples} samples of 3x32x32, batch {args.batch_size}, CPU threads {torch.get_num_threads()}")
    print("| model | full: verdict, gap, samples, s | quick: verdict, gap, samples, s | quick / full time | "
          "quick interval contains the full gap |")
    print("|---|---|---|---:|---|")
    for name, model in (("healthy", healthy), ("running mean shifted", broken)):
        runs = {}
        for quick in (False, True):
            runs[quick] = best_of(args.repeats, lambda: bncheck.diagnose(
                model, (x, y), device="cpu", batch_size=args.batch_size, quick=quick))
        (full_s, full), (quick_s, fast) = runs[False], runs[True]
        low, high = fast.gap.accuracy_ci
        print(f"| {name} | {full.verdict.value}, {full.gap.accuracy * 100:+.1f} pts, {full.data.num_samples}, "
              f"{full_s:.2f} | {fast.verdict.value}, {fast.gap.accuracy * 100:+.1f} pts, {fast.data.num_samples}, "
              f"{quick_s:.2f} | {quick_s / full_s:.3f} | {'yes' if low <= full.gap.accuracy <= high else 'NO'} "
              f"[{low * 100:+.1f}, {high * 100:+.1f}] |", flush=True)


if __name__ == "__main__":
    main()
