"""What a diagnosis and a recalibration cost, as whole processes, against the plain passes they replace.

    python benchmarks/engine_cost.py [--archs resnet18,mobilenet_v2,efficientnet_b0,densenet121]
                                     [--samples 512] [--size 64] [--batch-size 32] [--repeats 5] [--device cpu]

For each torchvision architecture (weights=None, running statistics set by a few train-mode
passes and saved as a checkpoint) it times, alternating run by run, five processes that all
import torch and torchvision, build the model from the same model.py and load the same checkpoint:

* floor: one plain eval pass plus one plain BN-train pass (momentum 0) over the data;
* ``bncheck diagnose``;
* update_bn: ``torch.optim.swa_utils.update_bn`` then ``torch.save`` of the state_dict;
* ``bncheck recalibrate --no-eval`` and ``bncheck recalibrate`` (before/after evaluation).

It prints the median wall time of each, the ratios the targets are stated in (the median over
rounds of each round's ratio), and the ratio of the processes' peak RSS. Run it on an idle
machine: every process is timed whole.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_PY = '''
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

ARCH, SAMPLES, SIZE, BATCH = {arch!r}, {samples}, {size}, {batch}


def build_model():
    torch.manual_seed(0)
    return torchvision.models.get_model(ARCH, weights=None, num_classes=10)


def get_dataloader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (SAMPLES,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)
'''


def load_user_model(folder: Path, *, checkpoint: bool = True):
    """What bncheck does with MODEL and --checkpoint: import model.py, build, load the weights."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    if checkpoint:
        model.load_state_dict(torch.load(folder / "ck.pt"))
    return model, module.get_dataloader()


def worker_floor(folder: Path, device: str) -> None:
    import torch
    from torch import nn

    model, loader = load_user_model(folder)
    model.to(device).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for xb, _ in loader:  # eval pass
            model(xb.to(device))
        for m in norms:  # BN-train pass: batch statistics, running statistics left alone
            m.train()
            m.momentum = 0.0
        for xb, _ in loader:
            model(xb.to(device))


def worker_update_bn(folder: Path, device: str) -> None:
    import torch

    model, loader = load_user_model(folder)
    model.to(device)
    torch.optim.swa_utils.update_bn(loader, model, device=torch.device(device))
    torch.save(model.state_dict(), folder / "update_bn.pt")


def prepare(folder: Path, arch: str, samples: int, size: int, batch: int) -> None:
    import torch

    (folder / "model.py").write_text(MODEL_PY.format(arch=arch, samples=samples, size=size, batch=batch))
    model, loader = load_user_model(folder, checkpoint=False)
    model.train()
    with torch.no_grad():  # realistic running statistics (0/1 ones overflow into denormals in eval)
        for i, (xb, _) in enumerate(loader):
            if i == 4:
                break
            model(xb)
    torch.save(model.state_dict(), folder / "ck.pt")


def timed_process(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return elapsed, usage.ru_maxrss / 1024


def commands(folder: Path, device: str) -> dict[str, list[str]]:
    me, py = str(Path(__file__).resolve()), sys.executable
    bn = [py, "-m", "bncheck"]
    common = ["model.py", "--checkpoint", "ck.pt", "--device", device, "--quiet"]
    return {
        "floor": [py, me, "worker", "floor", str(folder), device],
        "diagnose": bn + ["diagnose", *common, "--format", "json"],
        "update_bn": [py, me, "worker", "update_bn", str(folder), device],
        "recalibrate --no-eval": bn + ["recalibrate", *common, "--no-eval", "-o", "out.pt", "--force"],
        "recalibrate": bn + ["recalibrate", *common, "-o", "out.pt", "--force"],
    }


def measure(arch: str, args) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each variant's wall times, one per round, and its peak RSS over all rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder, arch, args.samples, args.size, args.batch_size)
        runs = commands(folder, args.device)
        times: dict[str, list[float]] = {name: [] for name in runs}
        rss: dict[str, float] = {name: 0.0 for name in runs}
        for name, argv in runs.items():  # warm the file cache once
            timed_process(argv, folder)
        for _ in range(args.repeats):  # alternating: every variant once per round
            for name, argv in runs.items():
                seconds, peak = timed_process(argv, folder)
                times[name].append(seconds)
                rss[name] = max(rss[name], peak)
        return times, rss


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of one round's ratio: runs of one round are seconds apart, so a slow
    spell of the machine (a shared VM's neighbours) slows both sides of the ratio alike."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        {"floor": worker_floor, "update_bn": worker_update_bn}[sys.argv[2]](Path(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="resnet18,mobilenet_v2,efficientnet_b0,densenet121")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{args.samples} samples of 3x{args.size}x{args.size}, batch {args.batch_size}, device {args.device}, "
          f"median of {args.repeats} alternating rounds; times are whole processes, ratios the median of "
          "each round's")
    print("| architecture | floor s | diagnose s | diagnose / floor | update_bn s | recalibrate --no-eval / "
          "update_bn | recalibrate / update_bn | peak RSS diagnose / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        times, rss = measure(arch, args)
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"| {arch} | {median['floor']:.2f} | {median['diagnose']:.2f} | "
              f"{paired_ratio(times, 'diagnose', 'floor'):.3f} | {median['update_bn']:.2f} | "
              f"{paired_ratio(times, 'recalibrate --no-eval', 'update_bn'):.3f} | "
              f"{paired_ratio(times, 'recalibrate', 'update_bn'):.3f} | {rss['diagnose'] / rss['floor']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
