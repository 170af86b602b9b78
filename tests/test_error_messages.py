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
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("Error: No such option '--bogus'")


def test_help_and_version_still_exit_0(tmp_path):
    assert run("diagnose", "--help").exit_code == 0
    assert run("--version").exit_code == 0
    assert run("inspect", write_model(tmp_path)).exit_code == 0


CONV_MODEL = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
"""


def test_an_unreadable_image_is_not_blamed_on_shapes(tmp_path):
    from PIL import Image

    from test_cli import write_source

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 10), (40 * i, 100, 200)).save(tmp_path / "images" / name / f"{i}.png")
    damaged = tmp_path / "images" / "dog" / "2.png"
    damaged.write_bytes(damaged.read_bytes()[:40])
    model_py = write_source(tmp_path, CONV_MODEL)
    line = assert_input_error(run("diagnose", model_py, "--data", tmp_path / "images", "--image-size", "8"),
                              "cannot load batch 0", "not damaged")
    assert "share one shape" not in line and "--image-size" not in line


def _batches_failing_with(error):
    import torch

    class Failing(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            if index == 5:
                raise error
            return torch.randn(4), index % 2

    return torch.utils.data.DataLoader(Failing(), batch_size=8)


@pytest.mark.parametrize("error, hint", [
    (OSError("Input/output error"), "not damaged"),
    (KeyError("label"), "__getitem__"),
])
def test_a_batch_that_fails_to_load_gets_a_hint_that_fits(error, hint):
    import bncheck
    from test_bad_inputs import mlp

    with pytest.raises(bncheck.errors.DataError, match="cannot load batch 0") as caught:
        bncheck.diagnose(mlp(), _batches_failing_with(error), device="cpu")
    assert hint in str(caught.value) and "share one shape" not in str(caught.value)


def test_samples_of_different_shapes_are_told_how_to_fix_it():
    import torch

    import bncheck
    from test_bad_inputs import mlp

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.randn(4 if index < 4 else 5), index % 3

    loader = torch.utils.data.DataLoader(Ragged(), batch_size=8, sampler=torch.utils.data.SequentialSampler(range(8)))
    with pytest.raises(bncheck.errors.DataError, match="equal size.*samples must share one shape"):
        bncheck.diagnose(mlp(), loader, device="cpu")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras vs numpy 2
def test_a_keras_lambda_is_refused_with_bnchecks_own_advice(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    import numpy as np

    inputs = keras.Input((4,))
    z = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
    z = keras.layers.Lambda(lambda t: t * 2.0)(z)
    keras.Model(inputs, keras.layers.Dense(3)(z)).save(tmp_path / "lambda.keras")
    np.savez(tmp_path / "data.npz", x=np.ones((8, 4), dtype="float32"), y=np.arange(8) % 3)
    line = assert_input_error(run("inspect", tmp_path / "lambda.keras"), "Lambda layer", "--checkpoint")
    assert "safe_mode" not in line and not line.endswith("...")


def test_a_protocol_4_pickle_gives_one_line_and_no_torch_warnings(tmp_path):
    import warnings

    import torch

    from test_cli import import_file

    model_py = write_model(tmp_path)
    torch.save(import_file(model_py).build_model().state_dict(), tmp_path / "old.pt",
               _use_new_zipfile_serialization=False, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # what Python prints on stderr outside pytest
        result = run("inspect", model_py, "--checkpoint", tmp_path / "old.pt")
    assert_input_error(result, "pickle protocol", "save it again")
    assert [str(w.message) for w in shown] == []


def test_long_messages_are_cut_at_a_word_boundary():
    from bncheck.errors import summarize

    text = summarize(ValueError("word " * 100 + "loading function"), limit=60)
    assert len(text) <= 60 and text.endswith("word...")


@pytest.mark.parametrize("image_size", [None, "8"])
def test_an_image_too_large_to_open_safely_is_an_input_error(image_size, tmp_path, monkeypatch):
    from PIL import Image

    from test_cli import write_source

    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (60 * i, 90, 30)).save(tmp_path / "images" / name / f"{i}.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "images" / "dog" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # PIL refuses over twice this: a decompression bomb
    model_py = write_source(tmp_path, CONV_MODEL)
    args = ["--image-size", image_size] if image_size else []
    assert_input_error(run("diagnose", model_py, "--data", tmp_path / "images", *args), "exceeds limit")
