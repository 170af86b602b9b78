"""Every failure is one line on stderr that says what to do: usage errors, load failures, refusals."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_cli import REPO, assert_input_error, run, write_model


@pytest.mark.parametrize("args, fragment", [
    (["diagnose", "model.py", "--nope"], "No such option '--nope'"),
    (["diagnose"], "Missing argument 'MODEL'"),
    (["nope"], "No such command 'nope'"),
    (["diagnose", "model.py", "--format", "yaml"], "'yaml' is not one of"),
    (["recalibrate", "model.py", "--batch-size", "1", "-o", "x.pt"], "1 is not in the range x>=2"),
    (["recalibrate", "model.py"], "Missing option '-o'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, fragment):
    line = assert_input_error(run(*args), fragment, "--help")
    assert "Usage:" not in line


def test_usage_errors_from_the_installed_entry_point_are_one_line():
    done = subprocess.run([sys.executable, "-m", "bncheck", "inspect", "model.py", "--bogus"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("Error: No such option '--bogus'")


def test_help_and_version_still_exit_0(tmp_path):
    assert run("diagnose", "--help").exit_code == 0
    assert run("--version").exit_code == 0
    assert run("inspect", write_model(tmp_path)).exit_code == 0
