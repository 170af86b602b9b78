"""Bad input is an input error (exit 2, one line), never a crash, a silent misreading or a pass."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

import bncheck
from bncheck.render.format import drift_bar, drift_style, num, pct, signed_points
from conftest import write_light_model as write_model
from test_cli import assert_input_error, import_file, run


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(3, 4, generator=g)
    y = torch.arange(n) % 3
    return (centers[y] + torch.randn(n, 4, generator=g)) * 2 + 5, y


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, _ = data()
    with torch.no_grad():
        for _ in range(30):
            model(x)
    return model.eval()


# --- NaN, inf and negative running variances (item 2) ---------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_number_formatters_take_nan_and_inf(value):
    for text in (num(value), pct(value), signed_points(value), drift_bar(value, 10)):
        assert isinstance(text, str)
    assert drift_bar(math.inf, 4) == "██¦██+" and drift_bar(math.nan, 4) == "░░¦░░"
    assert drift_style(math.nan) == "red" and drift_style(math.inf) == "red"


@pytest.fixture(params=["nan", "inf", "negative"])
def corrupt_checkpoint(request, tmp_path):
    model_py = write_model(tmp_path)
    state = import_file(model_py).build_model().state_dict()
    state["1.running_var"][:3] = {"nan": math.nan, "inf": math.inf, "negative": -1.0}[request.param]
    torch.save(state, tmp_path / "corrupt.pt")
    return model_py, tmp_path / "corrupt.pt", request.param


@pytest.mark.parametrize("fmt", ["terminal", "markdown", "json"])
def test_corrupt_running_variance_renders_and_nan_outputs_fail(corrupt_checkpoint, fmt):
    model_py, checkpoint, kind = corrupt_checkpoint
    result = run("diagnose", model_py, "--checkpoint", checkpoint, "--format", fmt)
    assert "stats-corrupt" in result.stdout, (result.stderr, result.exception)
    if kind == "inf":  # x / sqrt(inf) is 0: the outputs stay finite and the gap decides
        assert result.exit_code in (0, 1)
        return
    assert result.exit_code == 1  # sqrt of a negative variance or NaN: NaN outputs
    if fmt == "json":
        report = json.loads(result.stdout)
        assert report["verdict"] == "fail" and report["gate"]["metric"] == "nonfinite_eval_outputs"
    else:
        assert "NaN or inf" in result.stdout.splitlines()[0 if fmt == "terminal" else 2]


def test_nan_eval_outputs_fail_in_the_library():
    model = mlp()
    with torch.no_grad():
        model[1].running_var.fill_(math.nan)
    report = bncheck.diagnose(model, data(), device="cpu")
    assert not report.passed
    assert report.gate.metric == "nonfinite_eval_outputs" and report.gate.value == 1.0
    assert "stats-corrupt" in {f.code for f in report.findings}


# --- I/O and input failures are input errors (item 6) ---------------------------------------------


FULL_DISK_RUNS = """
import json, resource, signal, sys
from click.testing import CliRunner
from bncheck.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    results.append([result.exit_code, result.stderr])
print(json.dumps(results))
"""


def test_a_write_that_runs_out_of_space_is_an_input_error(tmp_path):
    """Each file may grow to 2000 bytes only (in a fresh interpreter): the report, a torch.save
    checkpoint and a safetensors one all fail to be written, with one line and no file left."""
    pytest.importorskip("resource")
    import subprocess
    import sys

    from test_cli import REPO

    model_py = write_model(tmp_path, extra="""
        _build = build_model
        def build_model():  # a state_dict bigger than the limit
            model = _build()
            model.register_buffer("padding", torch.zeros(4096))
            return model
        """)
    out = tmp_path / "out"
    out.mkdir()
    outputs = ["report.json", "fixed.pt", "fixed.safetensors"]
    runs = [["diagnose", str(model_py), "-o", str(out / outputs[0]), "--format", "json", "--per-channel"],
            ["recalibrate", str(model_py), "-o", str(out / outputs[1])],
            ["recalibrate", str(model_py), "-o", str(out / outputs[2])]]
    done = subprocess.run([sys.executable, "-c", FULL_DISK_RUNS, json.dumps(runs)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    for (code, stderr), output in zip(json.loads(done.stdout.strip().splitlines()[-1]), outputs):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith(f"Error: cannot write {out / output}") and "free disk space" in lines[0]
        assert "internal error" not in lines[0]
    assert list(out.iterdir()) == []


def test_writing_to_a_full_device_is_an_input_error(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    assert_input_error(run("diagnose", write_model(tmp_path), "-o", "/dev/full"), "cannot write /dev/full",
                       "No space left on device", "free disk space")


def test_tied_weights_are_written_as_safetensors(tmp_path):
    model_py = write_model(tmp_path, extra="""
        _build = build_model
        class Tied(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.alias = inner, inner[0]  # one Linear under two names: tied weights
            def forward(self, x):
                return self.inner(x)
        def build_model():
            return Tied(_build())
        """)
    fixed = tmp_path / "fixed.safetensors"
    result = run("recalibrate", model_py, "-o", fixed)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    state = load_file(str(fixed))
    assert torch.equal(state["inner.0.weight"], state["alias.weight"])
    assert run("diagnose", model_py, "--checkpoint", fixed).exit_code == 0


def _npy_claiming(items: int) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (items, 4)})
    return buffer.getvalue() + b"\0" * 64


def _damaged_npz(tmp_path) -> bytes:
    import numpy as np

    np.savez(tmp_path / "good.npz", x=np.ones((64, 4), dtype="float32"), y=np.arange(64) % 3)
    payload = bytearray((tmp_path / "good.npz").read_bytes())
    payload[200] ^= 0xFF  # inside x's data: the zip's checksum no longer matches
    return bytes(payload)


@pytest.mark.parametrize("name, payload, fragment", [
    ("garbage.npz", lambda tmp: b"garbage", "not a .npz archive"),
    ("truncated.npz", lambda tmp: b"PK\x03\x04" + b"\0" * 40, "not a .npz archive"),
    ("damaged.npz", _damaged_npz, "damaged"),
    ("huge.npy", lambda tmp: _npy_claiming(10 ** 12), "claims an array of shape (1000000000000, 4)"),
    ("garbage.npy", lambda tmp: b"garbage", "not a numpy array file"),
    ("objects.npy", lambda tmp: b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (3,), }"
     .ljust(128, b" ")[:127] + b"\n", "holds Python objects"),
])
def test_damaged_numpy_files_are_input_errors(name, payload, fragment, tmp_path):
    path = tmp_path / name
    path.write_bytes(payload(tmp_path))
    assert_input_error(run("diagnose", write_model(tmp_path), "--data", path), f"data {path}", fragment)


def test_a_seed_beyond_64_bits_is_a_usage_error(tmp_path):
    assert_input_error(run("diagnose", write_model(tmp_path), "--seed", "100000000000000000000000"),
                       "Invalid value for '--seed'")


def test_a_head_too_big_to_allocate_is_an_input_error():
    pytest.importorskip("torchvision")
    assert_input_error(run("inspect", "torchvision:resnet18", "--num-classes", "1000000000000"),
                       "torchvision:resnet18 cannot be built", "number of classes")


# --- a checkpoint without num_batches_tracked (item 7) --------------------------------------------

FRESH_MODEL = """
import torch
from torch import nn

def build_model():  # a fresh model: num_batches_tracked is 0 until a checkpoint is loaded
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
"""


@pytest.mark.parametrize("trained", [True, False])
def test_a_checkpoint_without_update_counters_is_judged_by_its_values(trained, tmp_path):
    from test_cli import write_source

    model_py = write_source(tmp_path, FRESH_MODEL)
    state = (mlp() if trained else import_file(model_py).build_model()).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    result = run("inspect", model_py, "--checkpoint", tmp_path / "old.pt", "--format", "json")
    report = json.loads(result.stdout)
    codes = {f["code"] for f in report["findings"]}
    if trained:
        assert result.exit_code == 0 and not codes & {"stats-never-updated", "stats-not-converged"}, codes
        assert report["layers"][0]["num_batches_tracked"] is None
    else:  # mean 0 and variance 1: never updated, whatever the counter
        assert result.exit_code == 1 and "stats-never-updated" in codes
    text = run("inspect", model_py, "--checkpoint", tmp_path / "old.pt").stdout
    assert "lacks num_batches_tracked of 1 norm layers" in " ".join(text.split())


def test_diagnose_with_a_checkpoint_without_update_counters(tmp_path):
    from test_cli import write_source

    model_py = write_source(tmp_path, FRESH_MODEL)
    trained = mlp()
    trained[1].running_mean += 2.0 * trained[1].running_var.sqrt()  # statistics of other data: a real problem
    torch.save({k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old.pt")
    torch.save(data(), tmp_path / "data.pt")
    result = run("diagnose", model_py, "--checkpoint", tmp_path / "old.pt", "--data", tmp_path / "data.pt",
                 "--format", "json")
    report = json.loads(result.stdout)
    assert report["layers"][0]["num_batches_tracked"] is None
    codes = {f["code"] for f in report["findings"]}
    assert "stats-never-updated" not in codes and "stats-not-converged" not in codes, codes


# --- NaN is bad input, not a discrepancy (item 8) -------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_regression_target_is_an_input_error(bad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, _ = data()
    targets = x.sum(1, keepdim=True)
    targets[40] = bad
    with pytest.raises(bncheck.errors.NonFiniteError, match="targets of batch .* contain NaN or inf"):
        bncheck.diagnose(model, (x, targets), device="cpu")


def test_a_nan_target_in_a_data_file_is_an_input_error(tmp_path):
    x, y = data()
    y = y.float()
    y[5] = math.nan
    torch.save((x, y), tmp_path / "nan_targets.pt")
    assert_input_error(run("diagnose", write_model(tmp_path), "--data", tmp_path / "nan_targets.pt"),
                       "targets of batch", "NaN or inf")


@pytest.mark.parametrize("how", ["option", "env"])
def test_max_gap_nan_is_a_usage_error(how, tmp_path):
    model_py = write_model(tmp_path)
    result = run("diagnose", model_py, "--max-gap", "nan") if how == "option" else \
        run("diagnose", model_py, env={"BNCHECK_MAX_GAP": "nan"})
    assert_input_error(result, "Invalid value for '--max-gap'", "nan is not a number")


def test_max_gap_nan_is_an_input_error_in_the_library():
    with pytest.raises(bncheck.InputError, match="max_gap must be a fraction from 0 to 1"):
        bncheck.diagnose(mlp(), data(), max_gap=math.nan, device="cpu")


# --- the library (item 9) ---------------------------------------------------------------------------


class FailsOnSecondPass:
    """Batches that load once; on the second pass over them batch 1 cannot be read."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        for index, batch in enumerate(self.batches):
            if self.passes == 2 and index == 1:
                raise OSError("the network share went away")
            yield batch


def test_inplace_recalibration_is_all_or_nothing():
    from conftest import assert_state_equal, state_copy

    model = mlp()
    with torch.no_grad():
        model[1].running_mean += 3.0  # something for recalibration to change
    before = state_copy(model)
    x, y = data()
    batches = FailsOnSecondPass(list(zip(x.split(32), y.split(32))))
    with pytest.raises(bncheck.errors.DataError, match="cannot load batch 1"):
        bncheck.recalibrate(model, batches, inplace=True, device="cpu")
    assert batches.passes == 2  # the statistics were measured and written before the failure
    assert_state_equal(model, before)
    result = bncheck.recalibrate(model, list(zip(x.split(32), y.split(32))), inplace=True, device="cpu")
    assert result.layers_updated == 1 and not torch.equal(model[1].running_mean, before["1.running_mean"])


def _weight_norm_model():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, and still used
        layer = torch.nn.utils.weight_norm(nn.Linear(4, 8))
    return nn.Sequential(layer, nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _model_holding_a_lock():
    import threading

    model = mlp()
    model.lock = threading.Lock()
    return model


@pytest.mark.parametrize("build", [_weight_norm_model, _model_holding_a_lock])
def test_a_model_that_cannot_be_copied_is_told_to_recalibrate_in_place(build):
    with pytest.raises(bncheck.InputError, match=r"cannot copy the model .*inplace=True"):
        bncheck.recalibrate(build(), data(), device="cpu")
    model = build()
    assert bncheck.recalibrate(model, data(), inplace=True, device="cpu").layers_updated == 1


@pytest.mark.parametrize("argument, value, fragment", [
    ("batch_size", 2.5, "batch_size must be a whole number, got 2.5"),
    ("batch_size", True, "batch_size must be a whole number"),
    ("seed", 2 ** 70, "seed must be a whole number from"),
    ("seed", 1.5, "seed must be a whole number from"),
    ("max_batches", 1.5, "max_batches must be a whole number"),
])
@pytest.mark.parametrize("function", ["diagnose", "recalibrate"])
def test_numeric_arguments_of_the_wrong_type_or_range_are_input_errors(function, argument, value, fragment):
    with pytest.raises(bncheck.InputError, match=fragment):
        getattr(bncheck, function)(mlp(), data(), device="cpu", **{argument: value})


# --- a list of two tensors is ambiguous (item 10) --------------------------------------------------


def test_a_list_of_two_tensors_is_refused_with_the_explicit_forms():
    x, y = data()
    with pytest.raises(bncheck.errors.DataError, match=r"list of two tensors.*a tuple \(inputs, targets\)"):
        bncheck.diagnose(mlp(), [x[:48], x[48:]], device="cpu")
    with pytest.raises(bncheck.errors.DataError, match="list of two tensors"):
        bncheck.recalibrate(mlp(), [x, y], device="cpu")
    assert bncheck.diagnose(mlp(), (x, y), device="cpu").task == "classification"  # the tuple is a pair
    unlabelled = bncheck.diagnose(mlp(), [(x[:48],), (x[48:],)], device="cpu")  # two batches, said so
    assert unlabelled.task == "label-free" and unlabelled.data.num_batches == 2
    three = bncheck.diagnose(mlp(), [x[:32], x[32:64], x[64:]], device="cpu")  # only batches fit
    assert three.task == "label-free" and three.data.num_samples == 96


# --- minor (item 13; the file-mode and long-name parts are in test_output_safety.py) ---------------


def test_inspect_writes_no_pycache_beside_the_users_files(tmp_path, monkeypatch):
    import sys

    from test_cli import write_source

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as Python runs without PYTHONDONTWRITEBYTECODE

    write_source(tmp_path, "SCALE = 2.0\n", name="neighbour.py")
    model_py = write_model(tmp_path, extra="""
        import neighbour  # a module beside model.py, imported by it
        """)
    assert run("inspect", model_py).exit_code in (0, 1)  # untrained: stats-never-updated, and no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "neighbour.py"]
    assert sys.dont_write_bytecode is False  # restored


def test_symlink_loops_in_an_image_folder_count_each_image_once(tmp_path):
    from PIL import Image

    from bncheck.loading.data_sources import load_data_path

    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name / "more").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (60 * i, 80, 160)).save(root / name / f"{i}.png")
            Image.new("RGB", (8, 8), (60 * i, 160, 80)).save(root / name / "more" / f"{i}.png")
        (root / name / "more" / "up").symlink_to("..")       # a loop back to the class folder
        (root / name / "more" / "self").symlink_to(".")      # a loop onto itself
        (root / name / "root").symlink_to("../..")           # a loop to the top (torchvision never ends here)
    dataset = load_data_path(root)
    assert len(dataset) == 12
    assert sorted(label for _, label in dataset.samples) == [0] * 6 + [1] * 6
    assert len({path for path, _ in dataset.samples}) == 12


# --- found by tests/test_fuzz_loaders.py -----------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"\x80\x02", b"garbage bytes", b"\x80\x02]q\x00."])
def test_garbage_in_a_torch_data_file_is_a_data_error(payload, tmp_path):
    from bncheck.loading.data_sources import load_data_path

    (tmp_path / "data.pt").write_bytes(payload)
    with pytest.raises(bncheck.errors.DataError, match="data .*data.pt"):
        load_data_path(tmp_path / "data.pt")


def test_a_zero_dimensional_array_holds_no_samples(tmp_path):
    import numpy as np

    from bncheck.loading.data_sources import load_data_path

    np.save(tmp_path / "scalar.npy", np.array(7, dtype="uint8"))
    with pytest.raises(bncheck.errors.DataError, match="holds no samples"):
        load_data_path(tmp_path / "scalar.npy")


def test_inputs_that_are_none_in_a_data_file(tmp_path):
    from bncheck.loading.data_sources import load_data_path

    torch.save({"inputs": None, "targets": torch.zeros(4)}, tmp_path / "data.pt")
    with pytest.raises(bncheck.errors.DataError, match="'inputs' holds a NoneType, not a tensor"):
        load_data_path(tmp_path / "data.pt")


def test_an_npz_whose_only_array_is_the_target(tmp_path):
    import numpy as np

    from bncheck.loading.data_sources import load_data_path

    np.savez(tmp_path / "only.npz", labels=np.arange(4))
    with pytest.raises(bncheck.errors.DataError, match="pass --input-key"):
        load_data_path(tmp_path / "only.npz", target_key="labels")


def test_boolean_class_labels_and_complex_targets():
    x, y = data()
    report = bncheck.diagnose(mlp(), (x, y == 1), device="cpu")  # labels 0/1 of a 3-class model
    assert report.task == "classification"
    with pytest.raises(bncheck.errors.DataError, match="complex numbers"):
        bncheck.diagnose(mlp(), (x, y.to(torch.complex64)), device="cpu")


SPECIAL_FILES = """
import sys
from bncheck.errors import BncheckError
from bncheck.loading.checkpoints import read_checkpoint
from bncheck.loading.data_sources import load_data_path
for load, path in ((read_checkpoint, sys.argv[1]), (load_data_path, sys.argv[2]), (read_checkpoint, "/dev/zero")):
    try:
        load(path)
    except BncheckError as error:
        print(error)
"""


def test_special_files_are_refused_before_they_are_read(tmp_path):
    """A FIFO would block forever and /dev/zero never ends: only regular files are read (in a fresh
    interpreter with a timeout, so that a regression fails instead of hanging the suite)."""
    import subprocess
    import sys

    from test_cli import REPO

    if not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.pt")
    os.mkfifo(tmp_path / "pipe.npz")
    done = subprocess.run([sys.executable, "-c", SPECIAL_FILES, str(tmp_path / "pipe.pt"), str(tmp_path / "pipe.npz")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["checkpoint", "data", "checkpoint"], done
    assert all("is not a regular file" in line for line in lines), lines


def test_garbage_is_not_blamed_on_a_pickle_protocol(tmp_path):
    from bncheck.loading.checkpoints import read_checkpoint

    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(bncheck.errors.CheckpointError, match="cannot be read") as caught:
        read_checkpoint(tmp_path / "garbage.pt")
    assert "protocol" not in str(caught.value)


@pytest.mark.parametrize("values", ["nan,nan", "inf,1", "0.5,1e400"])
def test_normalize_values_must_be_finite(values):
    from bncheck.loading.data_sources import parse_normalization

    with pytest.raises(bncheck.InputError, match="finite numbers"):
        parse_normalization(values)


def test_a_cuda_index_torch_cannot_parse_is_a_usage_error(tmp_path):
    assert_input_error(run("diagnose", write_model(tmp_path), "--device", "cuda:99999999999999999999"),
                       "Invalid value for '--device'")
