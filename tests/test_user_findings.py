"""Findings users keep hitting: a built case for each, a near miss that must not trigger it, and the CLI.

preprocessing-shift (drift in the first norm layer alone), averaged-weights-stale-stats (SWA/EMA weights
beside statistics of other weights), batch-dependent-eval outside the norm layers, and momentum=0 where
None was meant. A small three-block ConvNet trained on seeded 8x8 images is the model throughout; the
model.py files for the CLI build the same network and take their weights from ``--checkpoint``.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import bncheck
from bncheck.cli import EXIT_FAIL, EXIT_PASS, main
from bncheck.findings import Evidence, find_causes
from bncheck.report import Severity
from conftest import image_data, train_briefly
from test_findings import evidence, layer

NET_SOURCE = '''
import torch
from torch import nn

MOMENTUM = {momentum}


class Centered(nn.Sequential):
    """Subtracts the batch mean in forward: eval outputs depend on the batch."""

    def forward(self, x):
        return super().forward(x - x.mean(0, keepdim=True))


def build_model(centered={centered}):
    torch.manual_seed(0)
    kind = Centered if centered else nn.Sequential
    return kind(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=MOMENTUM), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=MOMENTUM), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=MOMENTUM), nn.ReLU(),
        nn.AvgPool2d(4), nn.Flatten(), nn.Linear(32, 3))
'''


def net_source(momentum: float = 0.1, centered: bool = False) -> str:
    return NET_SOURCE.format(momentum=momentum, centered=centered)


def build_net(**options) -> nn.Module:
    namespace: dict = {}
    exec(net_source(**options), namespace)
    return namespace["build_model"]()


def codes(report) -> dict:
    """Findings by code, of a report or of rule evidence."""
    findings = find_causes(report) if isinstance(report, Evidence) else report.findings
    return {f.code: f for f in findings}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def data():
    return image_data()


@pytest.fixture(scope="module")
def trained(data):
    x, y = data
    return train_briefly(build_net(), x, y, steps=120)


@pytest.fixture
def model_py(tmp_path):
    def write(**options):
        path = tmp_path / "model.py"
        path.write_text(net_source(**options))
        return path
    return write


@pytest.fixture
def files(tmp_path, data, trained):
    """The trained weights and the data as files for --checkpoint and --data."""
    x, y = data
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    torch.save((x, y), tmp_path / "data.pt")
    return tmp_path


# =========================================================================== preprocessing-shift


def ordered(*layers):
    return tuple(dataclasses.replace(l, order=i) for i, l in enumerate(layers))


def test_preprocessing_rule_and_near_misses():
    stem = layer("stem", drift=2.4, mean_shift_max=3.1, var_ratio_min=0.2, var_ratio_max=1.1)
    fine = [layer(f"b{i}", drift=0.05) for i in range(3)]
    f = codes(evidence(*ordered(stem, *fine), failed=True))["preprocessing-shift"]
    assert f.severity is Severity.ERROR and f.layers == ("stem",)
    assert f.evidence["mean_shift_max"] == 3.1 and f.evidence["std_ratio"] == pytest.approx(0.2 ** 0.5, abs=1e-4)
    assert "3.1 σ" in f.message and "Normalize" in f.message and "RGB vs BGR" in f.message
    assert "stats-mismatch" not in codes(evidence(*ordered(stem, *fine), failed=True))  # explained
    # with a passing gate it is still worth saying, as a warning
    assert codes(evidence(*ordered(stem, *fine)))["preprocessing-shift"].severity is Severity.WARNING
    # near miss: a later layer drifts too (a domain shift, not the input alone)
    spread = ordered(stem, layer("b0", drift=0.4), *fine[1:])
    found = codes(evidence(*spread, failed=True))
    assert "preprocessing-shift" not in found and "stats-mismatch" in found
    # near miss: the drifted layer is not the first in forward order
    middle = ordered(fine[0], stem, *fine[1:])
    assert "preprocessing-shift" not in codes(evidence(*middle, failed=True))
    # near miss: forward order unknown (no order, no registration order)
    assert "preprocessing-shift" not in codes(evidence(stem, *fine, failed=True))
    # registration order stands in for forward order until the engine records it
    ev = evidence(*fine, stem, failed=True, registration_order=("stem", "b0", "b1", "b2"))
    assert "preprocessing-shift" in codes(ev)


def test_preprocessing_names_a_0_255_scale():
    stem = layer("stem", drift=250.0, mean_shift_max=2.0, var_ratio_min=1 / 255 ** 2, var_ratio_max=1 / 200 ** 2)
    f = codes(evidence(*ordered(stem, layer("b")), failed=True))["preprocessing-shift"]
    assert "0–255" in f.message and "about 255 times training's" in f.message


def test_preprocessing_mentions_a_first_layer_kept_in_eval_as_information():
    stem = layer("stem", drift=2.0, batch_stats_in_train=False)
    f = codes(evidence(*ordered(stem, layer("b")), failed=True))["preprocessing-shift"]
    assert "under model.train() too" in f.message


def test_e2e_pixels_in_0_255(trained, data):
    x, y = data
    report = bncheck.diagnose(trained, (x * 255, y), device="cpu")
    found = codes(report)
    assert found["preprocessing-shift"].layers == ("1",) and "0–255" in found["preprocessing-shift"].message
    assert "stats-mismatch" not in found
    # near miss: the data as in training
    assert "preprocessing-shift" not in codes(bncheck.diagnose(trained, (x, y), device="cpu"))


def test_e2e_inputs_not_normalised(trained, data):
    x, y = data
    mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
    # trained on x: now fed "raw" data that a missing Normalize(mean, std) would have turned into x
    raw = x * std * 3 + mean + 2
    found = codes(bncheck.diagnose(trained, (raw, y), device="cpu"))
    assert found["preprocessing-shift"].layers == ("1",)


def test_cli_preprocessing_shift(model_py, files, data):
    x, y = data
    torch.save((x * 255, y), files / "pixels.pt")
    result = run_cli("diagnose", model_py(), "--checkpoint", files / "trained.pt", "--data", files / "pixels.pt",
                     "--format", "json")
    assert result.exit_code == EXIT_FAIL, result.output
    finding = next(f for f in json.loads(result.stdout)["findings"] if f["code"] == "preprocessing-shift")
    assert finding["severity"] == "error" and finding["layers"] == ["1"]
    result = run_cli("diagnose", model_py(), "--checkpoint", files / "trained.pt", "--data", files / "data.pt",
                     "--format", "json")
    assert result.exit_code == EXIT_PASS and json.loads(result.stdout)["findings"] == []


# =========================================================================== averaged-weights-stale-stats


def test_averaged_weights_rule_and_near_misses():
    drifted = [layer("a", drift=1.1), layer("b", drift=0.8)]
    hints = ("AveragedModel with n_averaged=160",)
    f = codes(evidence(*drifted, failed=True, averaging_hints=hints))["averaged-weights-stale-stats"]
    assert f.severity is Severity.ERROR and set(f.layers) == {"a", "b"} and f.evidence["averaging"] == list(hints)
    assert "weight averaging is the likely cause" in f.message and "update_bn" in f.fix
    assert "use_buffers=True" in f.fix
    assert "stats-mismatch" not in codes(evidence(*drifted, failed=True, averaging_hints=hints))
    # near misses: no sign of averaging (a plain mismatch), or averaged weights with fitting statistics
    assert "averaged-weights-stale-stats" not in codes(evidence(*drifted, failed=True))
    assert "stats-mismatch" in codes(evidence(*drifted, failed=True))
    assert codes(evidence(layer("a"), averaging_hints=hints)) == {}
    # layers kept in eval by model.train() are listed for information only
    kept = layer("k", drift=2.0, batch_stats_in_train=False)
    f = codes(evidence(*drifted, kept, failed=True, averaging_hints=hints))["averaged-weights-stale-stats"]
    assert "k" not in f.layers and f.evidence["drifted_layers_kept_in_eval"] == ["k"]


def ema_of_training(data, decay=0.995, use_buffers=False):
    """EMA weights over a training run, buffers copied from the model as AveragedModel does by default."""
    x, y = data
    model = build_net()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    model.train()
    for _ in range(160):
        idx = torch.randperm(len(x), generator=g)[:32]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        ema.update_parameters(model)
    return ema


@pytest.fixture(scope="module")
def ema(data):
    return ema_of_training(data)


def test_e2e_ema_weights_with_copied_statistics(ema, data):
    report = bncheck.diagnose(ema, data, device="cpu")
    f = codes(report)["averaged-weights-stale-stats"]
    assert not report.passed and f.severity is Severity.ERROR
    assert "n_averaged=160" in f.evidence["averaging"][0]
    assert "stats-mismatch" not in codes(report)
    # near miss: the statistics recomputed for the averaged weights
    x, _ = data
    fixed = AveragedModel(build_net())
    fixed.load_state_dict(ema.state_dict())
    update_bn(list(x.split(32)), fixed)
    report = bncheck.diagnose(fixed, data, device="cpu")
    assert report.passed and "averaged-weights-stale-stats" not in codes(report)


def test_e2e_a_drifted_model_that_was_never_averaged_is_a_mismatch(trained, data):
    model = build_net()
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model[4].running_mean += 3.0
    found = codes(bncheck.diagnose(model, data, device="cpu"))
    assert "averaged-weights-stale-stats" not in found and found["stats-mismatch"].layers == ("4",)


@pytest.mark.parametrize("layout", ["averaged_model", "ema_key"])
def test_cli_averaged_checkpoints(model_py, files, ema, layout):
    if layout == "averaged_model":
        torch.save(ema.state_dict(), files / "avg.pt")  # module.* keys and n_averaged
    else:
        torch.save({"model_ema": ema.module.state_dict(), "epoch": 3}, files / "avg.pt")
    result = run_cli("diagnose", model_py(), "--checkpoint", files / "avg.pt", "--data", files / "data.pt",
                     "--format", "json")
    assert result.exit_code == EXIT_FAIL, result.output
    report = json.loads(result.stdout)
    finding = next(f for f in report["findings"] if f["code"] == "averaged-weights-stale-stats")
    assert finding["severity"] == "error"
    expected = "n_averaged=160" if layout == "averaged_model" else "'model_ema'"
    assert expected in finding["evidence"]["averaging"][0]


def test_cli_ema_weights_beside_the_model_weights_are_named_not_loaded(model_py, files, trained, ema):
    torch.save({"state_dict": trained.state_dict(), "state_dict_ema": ema.module.state_dict()}, files / "both.pt")
    result = run_cli("diagnose", model_py(), "--checkpoint", files / "both.pt", "--data", files / "data.pt",
                     "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code == EXIT_PASS and report["findings"] == []  # the trained weights were loaded
    assert any("'state_dict_ema', not loaded" in note for note in report["notes"])


# =========================================================================== batch-dependent-eval outside norm layers


def test_batch_dependence_outside_norm_layers_rule():
    f = codes(evidence(layer("a"), eval_batch_dependence=0.3))["batch-dependent-eval"]
    assert f.layers == () and "outside the norm layers" in f.message and f.evidence["relative_output_change"] == 0.3
    for quiet in (0.0, 1e-5, None):
        assert "batch-dependent-eval" not in codes(evidence(layer("a"), eval_batch_dependence=quiet))
    # a norm layer without running statistics explains it and is named instead
    untracked = layer("u", tracks_running_stats=False, drift=None)
    f = codes(evidence(untracked, layer("a"), eval_batch_dependence=0.3))["batch-dependent-eval"]
    assert f.layers == ("u",) and "outside" not in f.message


def test_e2e_batch_mean_subtracted_in_forward(trained, data):
    model = build_net(centered=True)
    model.load_state_dict(trained.state_dict())
    report = bncheck.diagnose(model, data, device="cpu")
    f = codes(report)["batch-dependent-eval"]
    assert f.layers == () and "outside the norm layers" in f.message
    assert f.evidence["relative_output_change"] > 0.01
    assert all(l.drift < 0.5 for l in report.layers)  # no norm layer is blamed for it
    # near misses: the same network without the centering; randomness in eval (not batch dependence)
    assert "batch-dependent-eval" not in codes(bncheck.diagnose(trained, data, device="cpu"))

    class NoisyInEval(nn.Sequential):
        def forward(self, x):
            return super().forward(x + 0.5 * torch.randn_like(x))

    noisy = NoisyInEval(*build_net())
    noisy.load_state_dict(trained.state_dict())
    assert "batch-dependent-eval" not in codes(bncheck.diagnose(noisy, data, device="cpu"))


def test_cli_batch_dependent_eval(model_py, files):
    result = run_cli("diagnose", model_py(centered=True), "--checkpoint", files / "trained.pt", "--data",
                     files / "data.pt", "--format", "json")
    finding = next(f for f in json.loads(result.stdout)["findings"] if f["code"] == "batch-dependent-eval")
    assert finding["layers"] == [] and "outside the norm layers" in finding["message"]


def test_probe_leaves_the_model_as_it_was(trained, data):
    from bncheck.frameworks import adapter_for
    from bncheck.probes import eval_batch_dependence

    x, y = data
    model = build_net(centered=True)
    model.load_state_dict(trained.state_dict())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert eval_batch_dependence(adapter_for(model), (x[:16], y[:16]), torch.device("cpu")) > 0.01
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # fewer than 4 samples: nothing to compare
    assert eval_batch_dependence(adapter_for(model), (x[:3], y[:3]), torch.device("cpu")) is None


# =========================================================================== momentum=0 where None was meant


def test_cli_momentum_zero(model_py, tmp_path, data):
    x, y = data
    model = train_briefly(build_net(momentum=0.0), x, y, steps=60, settle=5)
    torch.save(model.state_dict(), tmp_path / "zero.pt")
    torch.save((x, y), tmp_path / "data.pt")
    result = run_cli("diagnose", model_py(momentum=0.0), "--checkpoint", tmp_path / "zero.pt", "--data",
                     tmp_path / "data.pt", "--format", "json")
    assert result.exit_code == EXIT_FAIL, result.output
    finding = next(f for f in json.loads(result.stdout)["findings"] if f["code"] == "stats-never-updated")
    assert "momentum=0" in finding["message"] and "momentum=None" in finding["message"]
    assert finding["evidence"]["momentum_zero_layers"] == 3
    # inspect reads it the same way, without data
    result = run_cli("inspect", model_py(momentum=0.0), "--checkpoint", tmp_path / "zero.pt", "--format", "json")
    finding = next(f for f in json.loads(result.stdout)["findings"] if f["code"] == "stats-never-updated")
    assert "momentum=None" in finding["message"]


def test_evidence_defaults_keep_old_callers_working():
    # Evidence built without the new fields behaves as before: no averaging, no probe, no order.
    ev = Evidence(layers=(layer("a"),))
    assert ev.averaging_hints == () and ev.eval_batch_dependence is None and ev.registration_order == ()
    assert find_causes(ev) == ()


def test_averaging_hints_from_the_model_structure():
    from bncheck.averaging import averaging_hints

    net = build_net()
    swa = AveragedModel(net)
    swa.update_parameters(net)
    assert averaging_hints(swa) == ("AveragedModel with n_averaged=1",)

    class ModelEmaV2(nn.Module):  # the shape of timm's EMA wrappers: the averaged copy in .module
        def __init__(self, model):
            super().__init__()
            self.module = model

    assert averaging_hints(ModelEmaV2(build_net())) == ("an EMA wrapper ModelEmaV2",)
    # near misses: a plain network, and names that merely contain the letters
    class SchemaNet(nn.Sequential):
        pass

    assert averaging_hints(net) == () and averaging_hints(SchemaNet(*build_net())) == ()


def test_probe_takes_dict_inputs_with_shared_tensors_and_never_breaks_a_diagnosis(data):
    from bncheck.frameworks import adapter_for
    from bncheck.probes import eval_batch_dependence

    x, y = data

    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_net()

        def forward(self, image, scale):  # scale: one tensor for the whole batch
            return self.net(image * scale)

    keyed = Keyed()
    batch = {"inputs": {"image": x[:16], "scale": torch.tensor([2.0])}, "targets": y[:16]}
    assert eval_batch_dependence(adapter_for(keyed), batch, torch.device("cpu"), scoring=None) == 0.0

    class FailsOnDuplicates(nn.Sequential):
        def forward(self, inputs):
            if len(torch.unique(inputs, dim=0)) < len(inputs):
                raise RuntimeError("duplicate samples")
            return super().forward(inputs)

    model = FailsOnDuplicates(*build_net())
    assert eval_batch_dependence(adapter_for(model), (x[:16], y[:16]), torch.device("cpu")) is None
    assert "batch-dependent-eval" not in codes(bncheck.diagnose(model, data, device="cpu"))
