"""The ``bncheck`` command line: exit codes, one-line error messages, report formats, files.

Every test drives the CLI in-process with ``click.testing.CliRunner`` on a tiny
model.py written into ``tmp_path`` (a 4-8-3 MLP with one BatchNorm1d on three
seeded clusters), except the ``--help`` import check and the terminal-progress
check, which need a fresh interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bncheck.cli import EXIT_ERROR, EXIT_FAIL, EXIT_PASS, main
from bncheck.render import OutputFormat, renderer_for

REPO = Path(__file__).resolve().parents[1]

# A model.py whose model is trained on three separated clusters and whose running
# statistics are then refreshed on the final weights. BREAK injects a fault; the
# data function is appended separately (DATA_FUNCTION, or a variant, or none).
TINY_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BREAK = {brk!r}


def _data(n=96, seed=0):
    # Three well-separated clusters, far from mean 0 / variance 1.
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(3, 4, generator=g)
    y = torch.arange(n) % 3
    x = centers[y] + torch.randn(n, 4, generator=g)
    return x * 2.0 + 5.0, y


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(40):
        for idx in torch.arange(len(y)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():  # refresh the running statistics on the final weights
        for _ in range(40):
            model(x)
    if BREAK == "reset":      # statistics never updated: mean 0, variance 1, 0 batches
        model[1].reset_running_stats()
    elif BREAK == "shift":    # statistics of other data
        model[1].running_mean += 3.0 * model[1].running_var.sqrt()
    return model
'''

DATA_FUNCTION = '''

def get_dataloader():
    x, y = _data()
    return DataLoader(TensorDataset(x, y), batch_size=32)
'''


def write_model(folder: Path, brk: str = "none", *, data: str | None = DATA_FUNCTION, name: str = "model.py",
                extra: str = "") -> Path:
    path = folder / name
    path.write_text(TINY_MODEL.format(brk=brk) + (data or "") + textwrap.dedent(extra))
    return path


def write_source(folder: Path, source: str, name: str = "model.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"test_cli_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_input_error(result, *fragments: str, internal: bool = False) -> str:
    """Exit code 2 and exactly one line on stderr, containing every fragment; nothing on stdout.
    Unless ``internal``, the error must be one bncheck anticipated, not an "internal error"."""
    assert result.exit_code == EXIT_ERROR, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback (most recent call last)" not in result.output
    assert internal or "internal error" not in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def diagnose_json(*args, env=None) -> tuple[int, dict]:
    result = run("diagnose", *args, "--format", "json", env=env)
    assert result.exit_code in (EXIT_PASS, EXIT_FAIL), (result.exit_code, result.stderr, result.exception)
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for brk in ("none", "reset", "shift"):
        (folder / brk).mkdir()
        paths[brk] = write_model(folder / brk, brk)
    (folder / "nodata").mkdir()
    paths["nodata-reset"] = write_model(folder / "nodata", "reset", data=None, name="reset.py")
    paths["nodata-none"] = write_model(folder / "nodata", "none", data=None, name="none.py")
    return paths


@pytest.fixture(scope="module")
def reports(models) -> dict[str, tuple[int, dict]]:
    """One JSON diagnosis per tiny model, shared by the schema and verdict tests."""
    return {brk: diagnose_json(models[brk], "--per-channel") for brk in ("none", "reset", "shift")}


# --- error paths: exit 2 and one line naming what to do ------------------------------------------


def test_missing_model_file(tmp_path):
    assert_input_error(run("diagnose", tmp_path / "nope.py"), "model file not found", "nope.py")


def test_model_argument_that_is_a_folder(tmp_path):
    assert_input_error(run("diagnose", tmp_path), "not a file", "model.py")


def test_syntax_error_names_the_line(tmp_path):
    path = write_source(tmp_path, """\
        import torch

        def build_model(:
            pass
        """)
    assert_input_error(run("diagnose", path), "syntax error", "line 3")


def test_import_error_in_model_file(tmp_path):
    path = write_source(tmp_path, "import no_such_module_for_bncheck\n")
    assert_input_error(run("diagnose", path), "error while importing", "no_such_module_for_bncheck")


def test_model_file_without_build_model(tmp_path):
    path = write_source(tmp_path, """\
        def get_dataloader():
            return None
        """)
    assert_input_error(run("diagnose", path), "must define build_model()")


def test_build_model_raising(tmp_path):
    path = write_source(tmp_path, """\
        def build_model():
            raise ValueError("weights are missing")
        """)
    assert_input_error(run("diagnose", path), "build_model()", "raised ValueError: weights are missing")


def test_build_model_returning_none(tmp_path):
    path = write_source(tmp_path, """\
        def build_model():
            pass
        """)
    assert_input_error(run("inspect", path), "returned None", "return the model")


def test_no_data(tmp_path):
    path = write_model(tmp_path, data=None)
    assert_input_error(run("diagnose", path), "must define get_dataloader()", "--data")


def test_no_data_for_recalibrate(tmp_path):
    path = write_model(tmp_path, data=None)
    assert_input_error(run("recalibrate", path, "-o", tmp_path / "out.pt"), "get_dataloader()", "--data")
    assert not (tmp_path / "out.pt").exists()


def test_get_dataloader_returning_none(tmp_path):
    path = write_model(tmp_path, data="\ndef get_dataloader():\n    return None\n")
    assert_input_error(run("diagnose", path), "get_dataloader", "return a DataLoader or Dataset")


def test_empty_dataset(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    return DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=8)
""")
    assert_input_error(run("diagnose", path), "empty")


def test_targets_that_do_not_fit_the_outputs(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    x, _ = _data()
    return DataLoader(TensorDataset(x, torch.zeros(len(x), 2, dtype=torch.long)), batch_size=32)
""")
    assert_input_error(run("diagnose", path), "model output (32, 3) does not fit integer targets (32, 2)")


def test_class_index_beyond_the_outputs(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    x, y = _data()
    return DataLoader(TensorDataset(x, y + 5), batch_size=32)
""")
    assert_input_error(run("diagnose", path), "targets hold class", "outputs 3 classes")


def test_inputs_the_model_cannot_take(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    x, y = _data()
    return DataLoader(TensorDataset(torch.randn(len(x), 5), y), batch_size=32)
""")
    assert_input_error(run("diagnose", path), "forward failed on batch 0", "(32, 5)")


def test_model_without_batchnorm(tmp_path):
    path = write_source(tmp_path, """\
        import torch
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def get_dataloader():
            return torch.randn(16, 4), torch.randint(0, 3, (16,))
        """)
    for command in (["diagnose"], ["inspect"]):
        assert_input_error(run(*command, path), "no BatchNorm", "nothing for bncheck to check")


def test_batchnorm_without_running_stats(tmp_path):
    path = write_source(tmp_path, """\
        from torch import nn

        def build_model():
            return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False))
        """)
    assert_input_error(run("inspect", path), "track_running_stats=False")


def test_nan_in_inputs(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    x, y = _data()
    x[5, 1] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=32)
""")
    assert_input_error(run("diagnose", path), "NaN", "clean the data")


def test_batch_size_option_of_one_is_a_usage_error(models):
    result = run("diagnose", models["none"], "--batch-size", "1")
    assert result.exit_code == EXIT_ERROR
    assert "Invalid value for '--batch-size'" in result.stderr
    assert result.stdout == ""


def test_loader_with_batch_size_one(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    return DataLoader(TensorDataset(*_data()), batch_size=1)
""")
    assert_input_error(run("diagnose", path), "batch size is 1", "--batch-size")


def test_loader_with_batch_size_one_is_fixed_by_the_option(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    return DataLoader(TensorDataset(*_data()), batch_size=1)
""")
    assert run("diagnose", path, "--batch-size", "32").exit_code == EXIT_PASS


def test_single_sample_dataset(tmp_path):
    path = write_model(tmp_path, data="""
def get_dataloader():
    return DataLoader(TensorDataset(torch.randn(1, 4), torch.zeros(1, dtype=torch.long)), batch_size=8)
""")
    assert_input_error(run("diagnose", path), "single sample", "2+ samples")


def test_bad_device_spelling(models):
    result = run("diagnose", models["none"], "--device", "gpu")
    assert result.exit_code == EXIT_ERROR
    assert "Invalid value for '--device'" in result.stderr
    assert "unknown device 'gpu'" in result.stderr and "cuda:N" in result.stderr
    assert result.stdout == ""


def test_cuda_when_not_available(models, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_input_error(run("diagnose", models["none"], "--device", "cuda"), "CUDA is not available",
                       "--device cpu")


def test_missing_checkpoint(models, tmp_path):
    assert_input_error(run("diagnose", models["none"], "--checkpoint", tmp_path / "nope.pt"),
                       "checkpoint not found", "nope.pt")


@pytest.mark.parametrize("command", ["diagnose", "inspect", "recalibrate"])
def test_missing_output_folder(models, tmp_path, command):
    result = run(command, models["none"], "-o", tmp_path / "no" / "such" / "out.pt")
    assert_input_error(result, "output folder does not exist", str(tmp_path / "no" / "such"))


def test_unknown_model_spec_word(tmp_path):
    assert_input_error(run("inspect", "torchvision:resnet1800"), "unknown torchvision model", "resnet18")


def test_missing_factory_named_in_the_spec(models):
    assert_input_error(run("inspect", f"{models['nodata-none']}:make_model"), "has no 'make_model'")


def test_factory_named_in_the_spec(tmp_path):
    path = write_model(tmp_path, "none", extra="""
        def make_broken():
            model = build_model()
            model[1].reset_running_stats()
            return model
        """)
    assert run("inspect", path).exit_code == EXIT_PASS
    assert run("inspect", f"{path}:make_broken").exit_code == EXIT_FAIL


def test_unexpected_exception_is_one_line_exit_2(models, monkeypatch):
    import bncheck.diagnosis

    def explode(*args, **kwargs):
        raise RuntimeError("first line\n  second line")

    monkeypatch.setattr(bncheck.diagnosis, "diagnose", explode)
    line = assert_input_error(run("diagnose", models["none"]), "internal error: RuntimeError: first line second line",
                              "BNCHECK_DEBUG=1", internal=True)
    assert line.endswith("(set BNCHECK_DEBUG=1 for the traceback)")
    result = run("diagnose", models["none"], env={"BNCHECK_DEBUG": "1"})
    assert result.exit_code == 2  # still an error exit, not "discrepancy found"
    assert "Traceback" in result.stderr and "second line" in result.stderr  # the traceback is shown
    assert "Traceback" not in run("diagnose", models["none"], env={"BNCHECK_DEBUG": "0"}).stderr


def test_ctrl_c_is_not_a_finding(tmp_path):
    path = write_source(tmp_path, """\
        def build_model():
            raise KeyboardInterrupt
        """)
    result = run("inspect", path)
    assert result.exit_code == 130
    assert result.stderr.strip() == "Aborted!"
    assert result.stdout == ""


# --- recalibrate never overwrites ------------------------------------------------------------------


def test_recalibrate_refuses_to_overwrite_without_force(models, tmp_path):
    target = tmp_path / "fixed.pt"
    target.write_bytes(b"precious")
    assert_input_error(run("recalibrate", models["shift"], "-o", target), "exists", "--force")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt"]


def test_recalibrate_overwrites_with_force(models, tmp_path):
    target = tmp_path / "fixed.pt"
    target.write_bytes(b"old")
    result = run("recalibrate", models["shift"], "-o", target, "--force", "--format", "json")
    assert result.exit_code == EXIT_PASS, result.stderr
    assert set(torch.load(target, weights_only=True)) == set(import_file(models["shift"]).build_model().state_dict())


@pytest.mark.parametrize("force", [False, True])
def test_recalibrate_refuses_output_equal_to_checkpoint(models, tmp_path, force):
    checkpoint = tmp_path / "weights.pt"
    torch.save(import_file(models["shift"]).build_model().state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    args = ["recalibrate", models["shift"], "--checkpoint", checkpoint, "-o", checkpoint]
    assert_input_error(run(*args, *(["--force"] if force else [])), "is the --checkpoint file", "never writes over")
    assert checkpoint.read_bytes() == before


# --- verdicts and the gate ------------------------------------------------------------------------


def test_healthy_model_passes(reports):
    code, report = reports["none"]
    assert code == EXIT_PASS
    assert report["verdict"] == "pass"
    assert not [f for f in report["findings"] if f["severity"] == "error"]


def test_stats_never_updated_fails(reports):
    code, report = reports["reset"]
    assert code == EXIT_FAIL
    assert report["verdict"] == "fail"
    assert report["findings"][0]["code"] == "stats-never-updated"
    assert report["findings"][0]["layers"] == ["1"]


def test_stats_at_init_explain_a_failed_gate_even_with_small_drift(tmp_path):
    # Data close to N(0, 1): the initial statistics are only mildly wrong (drift ~0.4),
    # yet the gate fails by over 20 points.
    path = write_model(tmp_path, "reset", extra="""
        def _data(n=96, seed=0):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, 4, generator=g)
            return x, x[:, :3].argmax(dim=1)
        """)
    code, report = diagnose_json(path)
    assert code == EXIT_FAIL and report["gap"]["accuracy"] > 0.15
    assert report["layers"][0]["running_stats_at_init"] and report["layers"][0]["num_batches_tracked"] == 0
    assert "stats-never-updated" in {f["code"] for f in report["findings"]}


def test_shifted_running_mean_fails(reports):
    code, report = reports["shift"]
    assert code == EXIT_FAIL
    assert report["verdict"] == "fail"
    assert report["layers"][0]["name"] == "1"
    assert report["layers"][0]["mean_shift_max"] > 1.0
    assert "stats-mismatch" in {f["code"] for f in report["findings"]}


def test_max_gap_changes_the_outcome(models, reports):
    gap = reports["shift"][1]["gap"]["accuracy"]
    assert 0 < gap < 1
    assert run("diagnose", models["shift"], "--max-gap", str(gap + 0.01)).exit_code == EXIT_PASS
    assert run("diagnose", models["shift"], "--max-gap", str(gap / 2)).exit_code == EXIT_FAIL


def test_negative_max_gap_is_a_usage_error(models):
    result = run("diagnose", models["none"], "--max-gap", "-0.1")
    assert result.exit_code == EXIT_ERROR
    assert "Invalid value for '--max-gap'" in result.stderr


def test_env_var_mirrors(models):
    result = run("diagnose", models["shift"], env={"BNCHECK_FORMAT": "json", "BNCHECK_MAX_GAP": "1.0"})
    assert result.exit_code == EXIT_PASS, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass" and report["gate"]["threshold"] == 1.0
    # The option beats the environment.
    result = run("diagnose", models["shift"], "--max-gap", "0", env={"BNCHECK_FORMAT": "json"})
    assert result.exit_code == EXIT_FAIL
    assert json.loads(result.stdout)["gate"]["threshold"] == 0.0


# --- the JSON report ------------------------------------------------------------------------------

LAYER_KEYS = {"name", "type", "num_features", "momentum", "num_batches_tracked", "mean_shift_max",
              "mean_shift_mean", "var_ratio_max", "drift"}
CHANNEL_KEYS = ("true_mean", "true_var", "true_var_unbiased", "running_mean", "running_var")


@pytest.mark.parametrize("brk", ["none", "reset", "shift"])
def test_json_schema(reports, brk):
    _, report = reports[brk]
    assert report["schema_version"] == 1
    assert report["bncheck_version"]
    assert report["kind"] == "diagnosis"
    assert report["verdict"] in ("pass", "fail")
    for mode in ("eval", "train"):
        assert set(report["metrics"][mode]) >= {"loss", "accuracy"}
        assert 0.0 <= report["metrics"][mode]["accuracy"] <= 1.0
    assert report["metrics"]["train_with_dropout"] is None  # the tiny model has no dropout
    gap = report["gap"]
    assert gap["accuracy"] == pytest.approx(report["metrics"]["train"]["accuracy"]
                                            - report["metrics"]["eval"]["accuracy"])
    assert gap["loss"] == pytest.approx(report["metrics"]["eval"]["loss"] - report["metrics"]["train"]["loss"])
    assert report["gate"]["metric"] == "accuracy"
    assert report["task"] == "classification"
    assert report["data"]["num_samples"] == 96
    drifts = [layer["drift"] for layer in report["layers"]]
    assert drifts == sorted(drifts, reverse=True)
    for layer in report["layers"]:
        assert set(layer) >= LAYER_KEYS
        assert layer["type"] == "BatchNorm1d" and layer["num_features"] == 8 and layer["momentum"] == 0.1
    for finding in report["findings"]:
        assert set(finding) == {"code", "severity", "layers", "evidence", "message", "fix"}
        assert finding["severity"] in ("error", "warning", "info")
        assert isinstance(finding["layers"], list) and isinstance(finding["evidence"], dict)
        assert finding["message"] and finding["fix"]


def test_per_channel_arrays(reports):
    _, report = reports["shift"]
    layer = report["layers"][0]
    for key in CHANNEL_KEYS:
        assert len(layer[key]) == layer["num_features"] == 8
    shifts = [(r - t) / v ** 0.5 for r, t, v in zip(layer["running_mean"], layer["true_mean"], layer["true_var"])]
    assert shifts == pytest.approx([3.0] * 8, abs=0.05)  # the model.py adds 3 running std to running_mean
    for biased, unbiased in zip(layer["true_var"], layer["true_var_unbiased"]):
        assert biased < unbiased


def test_no_per_channel_arrays_by_default(models):
    _, report = diagnose_json(models["none"])
    assert not set(CHANNEL_KEYS) & set(report["layers"][0])


def test_json_drift_order_with_two_layers(tmp_path):
    path = write_model(tmp_path, "none", data=DATA_FUNCTION, extra="""
        _build = build_model

        def build_model():
            inner = _build()
            model = nn.Sequential(*inner[:3], nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
            model.train()
            with torch.no_grad():
                for _ in range(40):
                    model(_data()[0])
            model[1].running_mean += 2.0
            return model
        """)
    _, report = diagnose_json(path, "--all-layers")
    assert [layer["name"] for layer in report["layers"]] == ["1", "4"]
    assert report["layers"][0]["drift"] > report["layers"][1]["drift"]


def test_stdout_is_json_without_quiet(models):
    result = run("diagnose", models["none"], "--format", "json")
    json.loads(result.stdout)
    assert result.stderr == ""  # no progress bar: stderr is not a terminal


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_goes_to_a_terminal_stderr_never_to_stdout(models):
    """With stderr on a terminal the progress bar is drawn there, and stdout stays pure JSON."""
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run([sys.executable, "-m", "bncheck", "diagnose", str(models["none"]), "--format", "json"],
                              stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, timeout=120,
                              env={**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"})
    finally:
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
    assert done.returncode == EXIT_PASS, b"".join(chunks)
    assert json.loads(done.stdout)["verdict"] == "pass"
    assert b"diagnosing" in b"".join(chunks)


# --- files ------------------------------------------------------------------------------------------


def test_output_file(models, tmp_path):
    target = tmp_path / "report.json"
    result = run("diagnose", models["shift"], "--format", "json", "-o", target)
    assert result.exit_code == EXIT_FAIL
    assert result.stdout == ""
    assert json.loads(target.read_text())["verdict"] == "fail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_output_file_for_inspect(models, tmp_path):
    target = tmp_path / "inspect.md"
    result = run("inspect", models["nodata-reset"], "--format", "markdown", "-o", target)
    assert result.exit_code == EXIT_FAIL
    assert result.stdout == ""
    assert "stats-never-updated" in target.read_text()


NAN_IN_BATCH_3 = """
def get_dataloader():
    x, y = _data()
    x[70] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=32)
"""


def test_no_output_file_when_the_run_fails(tmp_path):
    path = write_model(tmp_path, data=NAN_IN_BATCH_3)
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    assert_input_error(run("diagnose", path, "--format", "json", "-o", reports_dir / "report.json"), "NaN")
    assert list(reports_dir.iterdir()) == []


def test_no_output_checkpoint_when_recalibration_fails(tmp_path):
    path = write_model(tmp_path, data=NAN_IN_BATCH_3)
    out = tmp_path / "out"
    out.mkdir()
    assert_input_error(run("recalibrate", path, "-o", out / "fixed.pt"), "NaN")
    assert list(out.iterdir()) == []


# --- formats ---------------------------------------------------------------------------------------


def test_markdown_report(models):
    result = run("diagnose", models["shift"], "--format", "markdown")
    assert result.exit_code == EXIT_FAIL
    text = result.stdout
    assert text.startswith("## ❌ bncheck: FAIL")
    assert "| mode | loss | accuracy |" in text
    assert "|---|---:|---:|" in text
    assert "| `1` | BatchNorm1d |" in text
    assert "`stats-mismatch`" in text


def test_terminal_report(models):
    result = run("diagnose", models["reset"])
    assert result.exit_code == EXIT_FAIL
    assert "FAIL" in result.stdout and "stats-never-updated" in result.stdout
    assert "\x1b[" not in result.stdout  # no colour when stdout is not a terminal


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_every_format_has_a_renderer(fmt):
    renderer = renderer_for(fmt)()
    for method in ("diagnosis", "inspection", "recalibration"):
        assert callable(getattr(renderer, method)), (fmt, method)


def test_format_choices_match_the_enum():
    for name in ("diagnose", "inspect", "recalibrate"):
        option = next(p for p in main.commands[name].params if p.name == "fmt")
        assert list(option.type.choices) == [f.value for f in OutputFormat]


@pytest.mark.parametrize("fmt", [f.value for f in OutputFormat])
def test_every_format_renders_every_command(models, tmp_path, fmt):
    for args in (["diagnose", models["shift"]], ["inspect", models["nodata-none"]],
                 ["recalibrate", models["shift"], "-o", tmp_path / "fixed.pt"]):
        result = run(*args, "--format", fmt)
        assert result.exit_code in (EXIT_PASS, EXIT_FAIL), (args, result.stderr)
        assert result.stdout.strip()
        if fmt == "json":
            json.loads(result.stdout)


# --- help and documentation ------------------------------------------------------------------------


def test_help_does_not_import_torch():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from bncheck.cli import main\n"
            "for args in (['--help'], ['diagnose', '--help'], ['inspect', '--help'], ['recalibrate', '--help']):\n"
            "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert "bncheck" in result.stdout


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_help_has_an_example(name):
    result = run(name, "--help")
    assert result.exit_code == 0
    assert f"Example: bncheck {name} " in result.stdout


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_is_documented_in_the_readme(name):
    readme = (REPO / "README.md").read_text()
    assert f"bncheck {name}" in readme


# --- inspect ----------------------------------------------------------------------------------------


def test_inspect_stats_never_updated(models):
    result = run("inspect", models["nodata-reset"], "--format", "json")
    assert result.exit_code == EXIT_FAIL, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "inspection" and report["verdict"] == "fail"
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["stats-never-updated"]


def test_inspect_healthy_model_needs_no_data(models):
    result = run("inspect", models["nodata-none"], "--format", "json")
    assert result.exit_code == EXIT_PASS, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass"
    assert report["layers"][0]["num_batches_tracked"] > 0


# --- recalibrate ------------------------------------------------------------------------------------


def test_recalibrate_then_diagnose_passes(models, tmp_path):
    module = import_file(models["shift"])
    original = module.build_model()
    checkpoint = tmp_path / "shifted.pt"
    torch.save(original.state_dict(), checkpoint)
    before = checkpoint.read_bytes()
    fixed = tmp_path / "fixed.pt"

    result = run("recalibrate", models["shift"], "--checkpoint", checkpoint, "-o", fixed, "--format", "json")
    assert result.exit_code == EXIT_PASS, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "recalibration" and summary["layers_updated"] == 1
    assert summary["output_path"] == str(fixed)
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.pt", "shifted.pt"]

    state = torch.load(fixed, weights_only=True)
    fresh = module.build_model()
    fresh.load_state_dict(state)  # strict: every key, every shape
    assert not torch.allclose(state["1.running_mean"], original.state_dict()["1.running_mean"])
    assert torch.equal(state["0.weight"], original.state_dict()["0.weight"])

    assert run("diagnose", models["shift"], "--checkpoint", checkpoint).exit_code == EXIT_FAIL
    assert run("diagnose", models["shift"], "--checkpoint", fixed).exit_code == EXIT_PASS


def test_recalibrate_terminal_summary(models, tmp_path):
    result = run("recalibrate", models["reset"], "-o", tmp_path / "fixed.pt")
    assert result.exit_code == EXIT_PASS, result.stderr
    assert "1 norm layers recomputed" in result.stdout
    assert f"wrote {tmp_path / 'fixed.pt'}" in result.stdout.replace("\n", "")


def test_recalibrate_reports_before_and_after_on_val_data(models, tmp_path):
    module = import_file(models["shift"])
    x, y = module._data()
    x, y = x[::2] + 0.1 * torch.randn(48, 4, generator=torch.Generator().manual_seed(1)), y[::2]
    torch.save((x, y), tmp_path / "val.pt")  # nearby samples of the same clusters
    result = run("recalibrate", models["shift"], "-o", tmp_path / "fixed.pt", "--val-data", tmp_path / "val.pt",
                 "--format", "json")
    assert result.exit_code == EXIT_PASS, result.stderr
    rows = {row["data"]: row for row in json.loads(result.stdout)["evaluations"]}
    assert set(rows) == {"data", "val-data"}
    val = rows["val-data"]
    assert val["after"]["accuracy"] > val["before"]["accuracy"]
    model = module.build_model()
    model.load_state_dict(torch.load(tmp_path / "fixed.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert val["after"]["accuracy"] == pytest.approx(expected)


GC_RECORDING_MODEL = '''
import gc
import os

_build_tiny = build_model


class RecordsCollector(nn.Module):
    """Writes, at every forward, whether the cyclic GC runs and whether setup's objects are frozen."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with open(os.environ["GC_LOG"], "a") as log:
            log.write(f"{gc.isenabled()} {gc.get_freeze_count() > 0}\\n")
        return self.inner(x)


def build_model():
    return RecordsCollector(_build_tiny())
'''


@pytest.mark.parametrize("command", ["diagnose", "recalibrate"])
def test_the_collector_runs_during_the_passes_and_is_given_back_as_it_was(tmp_path, command):
    """Setup's long-lived objects are frozen for the passes (the collector skips them) and the
    collector is enabled; after the command, and after a failed one, it is as the caller had it."""
    import gc

    path = write_model(tmp_path, extra=GC_RECORDING_MODEL)
    log = tmp_path / "gc.log"
    args = ["-o", tmp_path / "fixed.pt"] if command == "recalibrate" else []
    assert gc.isenabled() and gc.get_freeze_count() == 0
    result = run(command, path, *args, env={"GC_LOG": str(log)})
    assert result.exit_code == EXIT_PASS, result.stderr
    seen = set(log.read_text().splitlines())
    assert seen == {"True True"}, seen
    assert gc.isenabled() and gc.get_freeze_count() == 0
    failed = run(command, tmp_path / "missing.py", "-o", tmp_path / "a.pt") if command == "recalibrate" \
        else run(command, tmp_path / "missing.py")
    assert failed.exit_code == EXIT_ERROR  # before the freeze
    assert gc.isenabled() and gc.get_freeze_count() == 0
    nan_data = write_model(tmp_path, extra=GC_RECORDING_MODEL + NAN_DATA, name="nan.py")
    failed = run(command, nan_data, *(["-o", tmp_path / "b.pt"] if command == "recalibrate" else []),
                 env={"GC_LOG": str(log)})
    assert failed.exit_code == EXIT_ERROR and "NaN" in failed.stderr  # after it, in the passes
    assert gc.isenabled() and gc.get_freeze_count() == 0


NAN_DATA = '''

def get_dataloader():
    x, y = _data()
    x[5, 0] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=32)
'''


def test_a_caller_that_froze_objects_itself_keeps_its_freeze(models):
    import gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert run("diagnose", models["none"]).exit_code == EXIT_PASS
        # Still frozen, and nothing added (frozen objects that lose their last reference are freed).
        assert gc.isenabled() and 0.9 * frozen < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
