"""Output files: never over an input by any name, never over an existing file without --force, never
half-written, whatever the timing or the signal."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bncheck import files
from bncheck.errors import InputError
from conftest import write_light_model
from test_cli import REPO, assert_input_error, import_file, run


@pytest.fixture
def model_py(tmp_path) -> Path:
    return write_light_model(tmp_path)


@pytest.fixture
def checkpoint(model_py, tmp_path) -> Path:
    path = tmp_path / "ck.pt"
    torch.save(import_file(model_py).build_model().state_dict(), path)
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.pt"
    torch.save((torch.randn(64, 4) * 2 + 5, torch.arange(64) % 3), path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links resolved) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


COMMANDS = {
    "diagnose": lambda m, ck, data: ["diagnose", m, "--checkpoint", ck, "--data", data, "--format", "json"],
    "inspect": lambda m, ck, data: ["inspect", m, "--checkpoint", ck, "--format", "json"],
    "recalibrate": lambda m, ck, data: ["recalibrate", m, "--checkpoint", ck, "--data", data],
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("which", ["model", "checkpoint", "data", "symlink", "hardlink"])
def test_an_output_that_is_an_input_is_refused(command, which, force, model_py, checkpoint, data_file, tmp_path):
    if command == "inspect" and which == "data":
        pytest.skip("inspect reads no data")
    if which == "symlink":
        output = tmp_path / "report.link"
        output.symlink_to(checkpoint)
    elif which == "hardlink":
        output = tmp_path / "report.hard"
        os.link(checkpoint, output)
    else:
        output = {"model": model_py, "checkpoint": checkpoint, "data": data_file}[which]
    before = snapshot(tmp_path)
    args = COMMANDS[command](model_py, checkpoint, data_file) + ["-o", output] + (["--force"] if force else [])
    assert_input_error(run(*args), "never writes over its inputs")
    assert snapshot(tmp_path) == before
    assert output.is_symlink() == (which == "symlink")


def test_recalibrate_never_writes_over_val_data(model_py, data_file, tmp_path):
    val = tmp_path / "val.pt"
    val.write_bytes(data_file.read_bytes())
    assert_input_error(run("recalibrate", model_py, "--val-data", val, "-o", val, "--force"),
                       "is the --val-data file")
    assert val.read_bytes() == data_file.read_bytes()


def test_no_output_inside_an_image_folder_given_as_data(model_py, tmp_path):
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    assert_input_error(run("diagnose", model_py, "--data", folder, "-o", folder / "cat" / "report.txt"),
                       "inside the --data folder")
    assert list((folder / "cat").iterdir()) == []


@pytest.mark.parametrize("command", ["diagnose", "inspect"])
def test_reports_never_replace_an_existing_file_without_force(command, model_py, tmp_path):
    target = tmp_path / "report.json"
    target.write_text("precious")
    assert_input_error(run(command, model_py, "--format", "json", "-o", target), "exists", "--force")
    assert target.read_text() == "precious"
    result = run(command, model_py, "--format", "json", "-o", target, "--force")
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(target.read_text())["verdict"] in ("pass", "fail")


def test_force_keeps_the_mode_of_the_file_it_replaces(model_py, tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    target.chmod(0o600)
    result = run("diagnose", model_py, "--format", "markdown", "-o", target, "--force")
    assert result.exit_code in (0, 1), result.stderr
    assert "bncheck" in target.read_text()
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_file_that_appears_during_the_run_is_not_replaced(tmp_path):
    """The race of two concurrent runs: the name is free at start-up and taken at the end."""
    out = tmp_path / "out.pt"
    model_py = write_light_model(tmp_path, extra=f"""
        _build = build_model
        def build_model():
            open({str(out)!r}, "w").write("the other run's checkpoint")
            return _build()
        """)
    assert_input_error(run("recalibrate", model_py, "-o", out), "exists", "--force")
    assert out.read_text() == "the other run's checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "out.pt"]


def test_the_final_step_is_an_exclusive_create(tmp_path):
    from bncheck.errors import OutputExistsError

    target = files.OutputTarget(tmp_path / "report.txt")

    def writer_racing_another_process(temp):
        Path(temp).write_text("ours")
        (tmp_path / "report.txt").write_text("theirs")

    with pytest.raises(OutputExistsError, match="appeared while bncheck ran"):
        files.write_output(target, writer_racing_another_process)
    assert (tmp_path / "report.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_a_symlinked_output_takes_its_format_from_the_typed_name(model_py, tmp_path):
    (tmp_path / "blobs").mkdir()
    link = tmp_path / "fixed.safetensors"
    link.symlink_to(tmp_path / "blobs" / "sha256-abc")
    result = run("recalibrate", model_py, "-o", link)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    written = tmp_path / "blobs" / "sha256-abc"
    assert link.is_symlink() and not zipfile.is_zipfile(written)  # torch.save writes a zip
    assert set(load_file(str(written))) == set(import_file(model_py).build_model().state_dict())


def test_force_never_replaces_a_pickled_model_given_as_model(model_py, data_file, tmp_path):
    full = tmp_path / "full.pt"
    torch.save(import_file(model_py).build_model(), full)
    before = full.read_bytes()
    assert_input_error(run("recalibrate", full, "--unsafe-pickle", "--data", data_file, "-o", full, "--force"),
                       "is the MODEL file")
    assert full.read_bytes() == before


def test_a_name_of_248_characters_can_be_written(model_py, tmp_path):
    target = tmp_path / ("r" * 243 + ".json")
    assert len(target.name) == 248
    result = run("diagnose", model_py, "--format", "json", "-o", target)
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(target.read_text())["kind"] == "diagnosis"
    fixed = tmp_path / ("f" * 245 + ".pt")
    assert run("recalibrate", model_py, "-o", fixed).exit_code == 0
    assert set(torch.load(fixed, weights_only=True)) == set(import_file(model_py).build_model().state_dict())


def test_a_name_too_long_for_the_file_system_fails_before_the_work(model_py, tmp_path):
    assert_input_error(run("recalibrate", model_py, "-o", tmp_path / ("f" * 300 + ".pt")), "shorter name")


def test_check_output_names_each_problem(tmp_path):
    from bncheck.errors import OutputIsInputError
    from bncheck.files import OutputTarget, check_output

    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output(OutputTarget(tmp_path / "folder"))
    with pytest.raises(InputError, match="output folder does not exist"):
        check_output(OutputTarget(tmp_path / "missing" / "r.txt"))
    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    with pytest.raises(OutputIsInputError, match="--data file"):
        check_output(OutputTarget(data, inputs=(("--data", data),), force=True))
    check_output(OutputTarget(tmp_path / "new.txt", inputs=(("--data", data),)))  # a new name is fine


SLOW_SAVE = """
    import pathlib, time
    _build = build_model
    def build_model():
        model = _build()
        def slow_while_writing(module, state, prefix, local_metadata):
            folder = pathlib.Path({folder!r})
            if any(p.name.startswith(".bncheck-") for p in folder.iterdir()):
                (folder / "writing").write_text("now")
                time.sleep(60)
        model._register_state_dict_hook(slow_while_writing)
        return model
    """


def _recalibrate_killed_while_writing(tmp_path, sig):
    """Run `recalibrate` in a fresh interpreter, send ``sig`` once its temporary file exists, and
    return (exit code, stderr, the output folder)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model_py = write_light_model(tmp_path, extra=SLOW_SAVE.format(folder=str(out_dir)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # A job started in the background (nohup, `&`) inherits SIGINT ignored, and Python keeps ignoring
    # it: give the child the default disposition, as a terminal would.
    process = subprocess.Popen([sys.executable, "-m", "bncheck", "recalibrate", str(model_py), "-o",
                                str(out_dir / "fixed.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "writing").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    (out_dir / "writing").unlink()
    return process.returncode, stderr, out_dir


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_writing_leaves_no_file(sig, code, tmp_path):
    returncode, stderr, out_dir = _recalibrate_killed_while_writing(tmp_path, sig)
    assert returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert list(out_dir.iterdir()) == []


def test_the_temporary_file_of_a_killed_run_is_swept_by_the_next_write(tmp_path):
    returncode, _, out_dir = _recalibrate_killed_while_writing(tmp_path, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    (stale,) = out_dir.iterdir()  # SIGKILL cannot be caught: its hidden partial file stays
    assert stale.name.startswith(".bncheck-")
    live = out_dir / f"{files.temp_prefix(os.getpid())}0123abcd.tmp.pt"  # a run still writing
    live.write_bytes(b"in progress")
    unrelated = out_dir / ".fixed.pt.swp"
    unrelated.write_bytes(b"not ours")
    assert run("recalibrate", write_light_model(tmp_path, name="other.py"), "-o", out_dir / "fixed.pt").exit_code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([live.name, unrelated.name, "fixed.pt"])
    assert files.sweep_stale_temp_files(out_dir) == []
