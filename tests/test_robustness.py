"""Inputs that real users have and that once escaped as internal errors or wrong numbers."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bncheck
from bncheck.cli import main


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(3, 4, generator=g)
    y = torch.arange(n) % 3
    return (centers[y] + torch.randn(n, 4, generator=g)) * 2 + 5, y


def trained_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        for _ in range(40):
            model(x)
    return model.eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_compiled_model_is_measured_on_its_eager_original():
    model = trained_mlp()
    x, y = data()
    eager = bncheck.diagnose(model, (x, y), device="cpu")
    compiled = torch.compile(model)
    report = bncheck.diagnose(compiled, (x, y), device="cpu")
    assert report.layers[0].channels.true_var == pytest.approx(eager.layers[0].channels.true_var, rel=1e-9)
    assert report.layers[0].drift == pytest.approx(eager.layers[0].drift, rel=1e-9)


def test_norm_layer_called_with_a_keyword_argument_is_measured():
    class KeywordCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.bn(input=self.fc(x)))

    x, y = data()
    report = bncheck.diagnose(KeywordCall(), (x, y), device="cpu")
    assert report.layers[0].drift is not None and report.layers[0].drift > 0.5


def test_targets_given_as_lists_are_read_as_tensors():
    model = trained_mlp()
    x, y = data()
    batches = [(x[i:i + 32], y[i:i + 32].tolist()) for i in range(0, 96, 32)]
    report = bncheck.diagnose(model, batches, device="cpu")
    assert report.task == "classification" and report.metrics.eval.accuracy > 0.9


def test_a_loss_fn_that_raises_is_an_input_error_and_the_model_is_restored():
    model = trained_mlp()
    before = state(model)
    with pytest.raises(bncheck.InputError, match="loss_fn raised on batch 0: ZeroDivisionError"):
        bncheck.diagnose(model, data(), loss_fn=lambda outputs, targets: 1 / 0, device="cpu")
    assert same(before, state(model))


def test_zero_max_batches_is_rejected():
    with pytest.raises(bncheck.InputError, match="max_batches must be at least 1"):
        bncheck.diagnose(trained_mlp(), data(), max_batches=0, device="cpu")


MODEL_PY = """
import sys
import torch
from torch import nn


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(3, 4, generator=g)
    y = torch.arange(n) % 3
    return (centers[y] + torch.randn(n, 4, generator=g)) * 2 + 5, y


def build_model():
    print("training...")  # user code that talks on stdout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _data()
    with torch.no_grad():
        for _ in range(50):
            model(x)
    {extra}
    return model


dataset = torch.utils.data.TensorDataset(*_data())
"""


def write(tmp_path, extra="", name="model.py"):
    path = tmp_path / name
    path.write_text(MODEL_PY.format(extra=extra))
    return str(path)


def test_prints_in_model_py_go_to_stderr_so_json_still_parses(tmp_path):
    result = CliRunner().invoke(main, ["diagnose", write(tmp_path), "--format", "json"])
    assert result.exit_code in (0, 1)
    assert json.loads(result.stdout)["kind"] == "diagnosis"
    assert "training..." in result.stderr


@pytest.mark.parametrize("extra", ["sys.exit(3)", "raise SystemExit('bye')"])
def test_sys_exit_in_model_py_is_an_input_error(tmp_path, extra):
    result = CliRunner().invoke(main, ["diagnose", write(tmp_path, extra)])
    assert result.exit_code == 2
    assert "raised SystemExit" in result.stderr


def test_corrupt_running_stats_in_a_checkpoint(tmp_path):
    model_py = write(tmp_path)
    bad = tmp_path / "bad.pt"
    import importlib.util

    spec = importlib.util.spec_from_file_location("m", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = module.build_model().state_dict()
    sd["1.running_var"][:3] = -1.0
    torch.save(sd, bad)
    result = CliRunner().invoke(main, ["diagnose", model_py, "--checkpoint", str(bad), "--format", "json"])
    report = json.loads(result.stdout)
    assert report["findings"][0]["code"] == "stats-corrupt"
    fixed = tmp_path / "fixed.safetensors"
    result = CliRunner().invoke(main, ["recalibrate", model_py, "--checkpoint", str(bad), "-o", str(fixed)])
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    assert (load_file(str(fixed))["1.running_var"] > 0).all()
    result = CliRunner().invoke(main, ["diagnose", model_py, "--checkpoint", str(fixed)])
    assert result.exit_code == 0
    assert oct(fixed.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_old_checkpoint_without_num_batches_tracked_is_not_never_updated(tmp_path):
    model_py = write(tmp_path)
    import importlib.util

    spec = importlib.util.spec_from_file_location("m", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = {k: v for k, v in module.build_model().state_dict().items() if "num_batches_tracked" not in k}
    torch.save(sd, tmp_path / "old.pt")
    result = CliRunner().invoke(main, ["inspect", model_py, "--checkpoint", str(tmp_path / "old.pt"),
                                       "--format", "json"])
    assert result.exit_code == 0, result.stdout
    assert "stats-never-updated" not in {f["code"] for f in json.loads(result.stdout)["findings"]}


def test_report_written_through_a_symlink_keeps_the_link(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = CliRunner().invoke(main, ["diagnose", write(tmp_path), "--format", "json", "-o", str(link), "--force"])
    assert result.exit_code in (0, 1)
    assert link.is_symlink()
    assert json.loads(target.read_text())["kind"] == "diagnosis"


def test_unwritable_output_is_an_input_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        result = CliRunner().invoke(main, ["diagnose", write(tmp_path), "-o", str(folder / "r.txt")])
        assert result.exit_code == 2 and "cannot write" in result.stderr
    finally:
        folder.chmod(0o700)


def test_recalibrate_refuses_a_keras_suffix_for_a_torch_model(tmp_path):
    result = CliRunner().invoke(main, ["recalibrate", write(tmp_path), "-o", str(tmp_path / "fixed.keras")])
    assert result.exit_code == 2 and "state_dict" in result.stderr
    assert not (tmp_path / "fixed.keras").exists()


def test_float_class_indices_are_classification():
    x, y = data()
    report = bncheck.diagnose(trained_mlp(), (x, y.float()), device="cpu")
    assert report.task == "classification" and report.metrics.eval.accuracy > 0.9


def test_a_loader_with_a_custom_sampler_is_used_as_given():
    x, y = data()
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16,
                                         sampler=torch.utils.data.SubsetRandomSampler(range(48)))
    report = bncheck.diagnose(trained_mlp(), loader, device="cpu")
    assert report.data.num_samples == 48 and not report.data.reshuffled


def test_recalibrated_model_passes_inspect_and_has_no_drift():
    model = trained_mlp()
    with torch.no_grad():
        model[1].reset_running_stats()  # stats lost: inspect warns, diagnose fails
    assert "stats-never-updated" in {f.code for f in bncheck.inspect(model).findings}
    assert not bncheck.diagnose(model, data(), device="cpu").passed
    _, fixed = bncheck.recalibrate(model, data(), device="cpu", return_model=True)
    # The counter now records the 3 batches averaged and the variances fit its floor: from the counter
    # alone inspect can only say so, as information, never as a warning.
    assert {f.code: f.severity.value for f in bncheck.inspect(fixed).findings} == {"stats-not-converged": "info"}
    assert int(fixed[1].num_batches_tracked) == 3
    # exact up to the float32 buffers, with variance conventions matched
    assert bncheck.diagnose(fixed, data(), device="cpu").layers[0].drift < 1e-6


def test_recalibrate_with_an_output_key_and_refuses_one_shot_generators():
    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return {"scores": self.inner(x), "aux": x.sum()}

    model = DictOut(trained_mlp())
    result = bncheck.recalibrate(model, data(), output_key="scores", device="cpu")
    assert result.evaluations[0].after.accuracy > 0.9
    x, y = data()
    batches = ((x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32))
    with pytest.raises(bncheck.InputError, match="one-shot generator"):
        bncheck.recalibrate(model, batches, output_key="scores", device="cpu")
