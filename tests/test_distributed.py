"""Across processes on torch.distributed (gloo on the CPU): the same numbers as one process.

Processes are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT in the environment), plus one run through torchrun itself. Every process runs
single-threaded, as torchrun sets it, so that only the sharding differs from the reference run.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MODEL = '''
import atexit
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FORWARDS = [0]


@atexit.register
def report_forwards():
    print(f"forwards={FORWARDS[0]}", file=sys.stderr)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(8, 3)

    def forward(self, x):
        FORWARDS[0] += 1
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean((2, 3))))


def build_model():
    torch.manual_seed(0)
    return Net()


def samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(int(os.environ.get("N_SAMPLES", "170")), 3, 8, 8, generator=g) * 2 + 1
    return TensorDataset(x, (x.mean((1, 2, 3)) > 1).long() + (x[:, 0].mean((1, 2)) > 1.2).long())


def get_dataloader():
    if os.environ.get("FAIL_ON_RANK", "none") == os.environ.get("RANK"):
        raise RuntimeError("this rank cannot read its data")
    if os.environ.get("DIE_ON_RANK", "none") == os.environ.get("RANK"):
        os._exit(9)  # killed: it never reaches an exchange
    return DataLoader(samples(), batch_size=16)  # 11 batches: uneven shards of 6 and 5
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(rank: int | None, world: int, port: int, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def launch(argv: list[str], cwd: Path, world: int = 2, timeout: float = 180, **extra):
    """Start ``world`` processes as torchrun would; (exit code, stdout, stderr) per rank."""
    port = free_port()
    procs = [subprocess.Popen(argv, cwd=cwd, env=env_for(rank, world, port, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


def single(argv: list[str], cwd: Path, timeout: float = 180, **extra):
    proc = subprocess.run(argv, cwd=cwd, env=env_for(None, 1, 0, **extra), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """model.py and a checkpoint of the trained model whose bn2 running mean is then shifted, so
    eval mode is clearly worse than train mode."""
    folder = tmp_path_factory.mktemp("dist")
    (folder / "model.py").write_text(MODEL)
    spec = importlib.util.spec_from_file_location("distributed_test_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    atexit.unregister(module.report_forwards)
    net = module.build_model()
    x, y = module.samples().tensors
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    net.train()
    for step in range(150):
        idx = torch.arange(step * 16, step * 16 + 16) % len(y)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        net.bn2.running_mean += 3.0
    torch.save(net.state_dict(), folder / "ck.pt")
    return folder


def forwards(stderr: str) -> int:
    return int(next(line for line in stderr.splitlines() if line.startswith("forwards=")).split("=")[1])


def assert_reports_match(multi: dict, one: dict) -> None:
    assert multi["verdict"] == one["verdict"]
    for mode in ("eval", "train"):
        for key in ("loss", "accuracy"):
            assert multi["metrics"][mode][key] == pytest.approx(one["metrics"][mode][key], rel=1e-6, abs=1e-9)
    assert multi["metrics"]["train_with_dropout"]["loss"] == pytest.approx(
        one["metrics"]["train_with_dropout"]["loss"], rel=1e-6)  # dropout masks are seeded per batch
    assert multi["gap"]["accuracy_ci"] == pytest.approx(one["gap"]["accuracy_ci"], rel=1e-6, abs=1e-9)
    assert (multi["data"]["num_samples"], multi["data"]["num_batches"]) == (170, 11) == \
        (one["data"]["num_samples"], one["data"]["num_batches"])
    assert multi["data"]["world_size"] == 2 and one["data"]["world_size"] == 1
    assert [f["code"] for f in multi["findings"]] == [f["code"] for f in one["findings"]]
    for a, b in zip(multi["layers"], one["layers"]):
        assert a["name"] == b["name"]
        for key in ("true_mean", "true_var", "true_var_unbiased", "running_mean"):
            scale = max(abs(v) for v in b["true_var"]) ** 0.5
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6 * scale), (a["name"], key)
        assert a["drift"] == pytest.approx(b["drift"], rel=1e-6)


def test_two_processes_give_the_single_process_report(workdir):
    argv = [sys.executable, "-m", "bncheck", "diagnose", "model.py", "--checkpoint", "ck.pt", "--format", "json",
            "--per-channel", "--device", "cpu"]
    (code0, out0, err0), (code1, out1, err1) = launch(argv, workdir)
    code, out, err = single(argv, workdir)
    assert code in (0, 1) and code0 == code1 == code, (err0, err1, err)
    assert out1 == ""  # rank 1 prints nothing on stdout
    assert_reports_match(json.loads(out0), json.loads(out))
    # each process ran about half the forwards: 6 and 5 batches of the 11, two forwards each, and
    # rank 0, which holds batch 0, the dropout pass on it and the two forwards of the eval batch-dependence probe
    assert forwards(err0) + forwards(err1) == forwards(err)
    assert (forwards(err0), forwards(err1)) == (2 * 6 + 1 + 2, 2 * 5)


def test_two_processes_recalibrate_to_the_single_process_checkpoint(workdir, tmp_path):
    argv = [sys.executable, "-m", "bncheck", "recalibrate", "model.py", "--checkpoint", "ck.pt", "--device", "cpu",
            "--format", "json"]
    results = launch(argv + ["-o", str(tmp_path / "multi.pt")], workdir)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert results[1][1] == "" and json.loads(results[0][1])["layers_updated"] == 2
    code, _, err = single(argv + ["-o", str(tmp_path / "one.pt")], workdir)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.pt", "one.pt"]  # one checkpoint, from rank 0
    multi, one = torch.load(tmp_path / "multi.pt"), torch.load(tmp_path / "one.pt")
    assert multi.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(multi[key].double(), one[key].double(), rtol=1e-6, atol=1e-6)


def test_a_failure_on_one_rank_stops_every_rank_with_one_line(workdir):
    argv = [sys.executable, "-m", "bncheck", "diagnose", "model.py", "--device", "cpu", "--dist-timeout", "60"]
    results = launch(argv, workdir, timeout=120, FAIL_ON_RANK="1")
    for code, out, err in results:
        lines = [line for line in err.splitlines() if not line.startswith("forwards=")]
        assert code == 2 and out == "", err
        assert len(lines) == 1 and "cannot read its data" in lines[0], err
    assert "rank 1 failed" in results[0][2]


def test_a_rank_that_dies_never_leaves_the_others_hanging(workdir):
    argv = [sys.executable, "-m", "bncheck", "diagnose", "model.py", "--device", "cpu", "--dist-timeout", "20"]
    (code0, out0, err0), (code1, _, _) = launch(argv, workdir, timeout=120, DIE_ON_RANK="1")
    assert code1 == 9
    lines = [line for line in err0.splitlines() if not line.startswith("forwards=")]
    assert code0 == 2 and out0 == "" and len(lines) == 1, err0
    assert "other processes" in lines[0]


def test_quick_stops_at_the_same_verdict_across_processes(workdir):
    argv = [sys.executable, "-m", "bncheck", "diagnose", "model.py", "--checkpoint", "ck.pt", "--format", "json",
            "--device", "cpu", "--batch-size", "16"]
    (code0, out0, err0), (code1, _, err1) = launch(argv + ["--quick"], workdir, N_SAMPLES="2048")
    code, out, err = single(argv, workdir, N_SAMPLES="2048")
    quick, full = json.loads(out0), json.loads(out)
    assert code0 == code1 == code == 1 and quick["verdict"] == full["verdict"] == "fail", (err0, err1, err)
    assert quick["data"]["stopped_early"] and not full["data"]["stopped_early"]
    assert 256 <= quick["data"]["num_samples"] < 1024 and full["data"]["num_samples"] == 2048
    assert quick["data"]["num_samples_available"] == 2048
    low, high = quick["gap"]["accuracy_ci"]
    assert low <= full["gap"]["accuracy"] <= high


def test_torchrun_itself(workdir):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    port = free_port()
    proc = subprocess.run([str(torchrun), "--nproc-per-node=2", f"--master-port={port}", "-m", "bncheck", "diagnose",
                           "model.py", "--checkpoint", "ck.pt", "--format", "json", "--device", "cpu"],
                          cwd=workdir, env=env_for(None, 1, 0), capture_output=True, text=True, timeout=240)
    report = json.loads(proc.stdout)  # only rank 0's report reaches stdout
    assert report["data"]["world_size"] == 2 and report["data"]["num_samples"] == 170
    assert proc.returncode == (0 if report["verdict"] == "pass" else 1), proc.stderr


LIBRARY_SCRIPT = '''
import json, os, sys
import torch, torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
sys.path.insert(0, os.getcwd())
import model
import bncheck

dist.init_process_group("gloo")
net = model.build_model()
net.load_state_dict(torch.load("ck.pt"))
if os.environ.get("SKEW") and dist.get_rank() == 1:
    with torch.no_grad():
        net.bn1.running_var *= 3.0   # DDP with broadcast_buffers=False: this rank kept its own averages
dataset = model.samples()
loader = DataLoader(dataset, batch_size=16, sampler=DistributedSampler(dataset, shuffle=False))
before = {k: v.clone() for k, v in net.state_dict().items()}
report = bncheck.diagnose(net, loader, device="cpu")
local = bncheck.diagnose(net, loader, device="cpu", distributed=False)
same = all(torch.equal(before[k], v) for k, v in net.state_dict().items())
print(json.dumps({"rank": dist.get_rank(), "samples": report.data.num_samples, "world": report.data.world_size,
                  "eval": report.metrics.eval.loss, "train": report.metrics.train.loss, "unchanged": same,
                  "findings": {f.code: list(f.layers) for f in report.findings},
                  "local_samples": local.data.num_samples}))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("skew", [False, True])
def test_library_call_inside_a_users_process_group(workdir, skew):
    (workdir / "inside.py").write_text(LIBRARY_SCRIPT)
    extra = {"SKEW": "1"} if skew else {}
    results = launch([sys.executable, "inside.py"], workdir, **extra)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    reports = [json.loads(out) for _, out, _ in results]
    assert reports[0]["eval"] == pytest.approx(reports[1]["eval"], rel=1e-12)  # one report on every rank
    for report in reports:
        # the DistributedSampler's padded shards are replaced by an exact split: 170 samples, not 2 x 85
        assert (report["samples"], report["world"], report["unchanged"]) == (170, 2, True)
        assert report["local_samples"] == 170  # distributed=False: this process alone, on all the data
        assert ("rank-stats-differ" in report["findings"]) is skew
    if skew:
        assert reports[0]["findings"]["rank-stats-differ"] == ["bn1"]


OWN_DATA_SCRIPT = '''
import os, sys
import torch, torch.distributed as dist
from torch.utils.data import Subset
sys.path.insert(0, os.getcwd())
import model
import bncheck
from bncheck.errors import DataError

dist.init_process_group("gloo")
net = model.build_model()
net.load_state_dict(torch.load("ck.pt"))
rank = dist.get_rank()
own = Subset(model.samples(), list(range(rank * 85, rank * 85 + 85)))   # each rank its own half
try:
    bncheck.diagnose(net, own, device="cpu")
    print("diagnosed")
except DataError as error:
    print("refused:", error)
print("alone:", bncheck.diagnose(net, own, device="cpu", distributed=False).data.num_samples)
dist.destroy_process_group()
'''


def test_processes_given_different_data_are_refused_not_mixed(workdir):
    (workdir / "own_data.py").write_text(OWN_DATA_SCRIPT)
    results = launch([sys.executable, "own_data.py"], workdir)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    for _, out, _ in results:
        lines = out.splitlines()
        assert lines[0].startswith("refused: the 2 processes were given different data"), out
        assert "distributed=False" in lines[0]
        assert lines[1] == "alone: 85"
