"""Property tests of every loader on hostile input: data files, image folders, checkpoints, batches and
targets. Whatever the bytes or shapes, bncheck either works or raises one of its own errors (an input
error, exit code 2), never anything else. Examples are few and small so that each test takes seconds."""
from __future__ import annotations

import io
import math
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import bncheck
from bncheck.errors import BncheckError, CheckpointError, DataError
from bncheck.loading.checkpoints import load_checkpoint_into
from bncheck.loading.data_sources import load_data_path

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not os.environ.get("FUZZ_EXAMPLES"))  # the same examples on every run and machine


def mlp(features: int = 4, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes)).eval()


def in_temp_folder(write):
    """Run ``write(folder)`` then load what it returns, in a fresh folder."""
    with tempfile.TemporaryDirectory() as folder:
        return write(Path(folder))


def loads_or_refuses(path, **options):
    """load_data_path either returns a dataset whose items can be read, or raises a bncheck error."""
    try:
        dataset = load_data_path(path, **options)
    except BncheckError as error:
        assert "\n" not in str(error).strip()
        return None
    assert len(dataset) > 0
    dataset[0]
    dataset[len(dataset) - 1]
    return dataset


# --- data files -------------------------------------------------------------------------------------

NUMERIC_DTYPES = st.sampled_from(["uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "float16",
                                  "float32", "float64", "bool", "complex64"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def arrays(dtype=NUMERIC_DTYPES, shape=SHAPES):
    return dtype.flatmap(lambda d: hnp.arrays(d, shape))


@FUZZ
@given(payload=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY\x01\x00",
                                                               b"\x80\x02", b"PK\x05\x06"]),
       suffix=st.sampled_from([".npz", ".npy", ".pt", ".pth"]))
def test_random_bytes_as_a_data_file(payload, prefix, suffix):
    def write(folder):
        path = folder / f"data{suffix}"
        path.write_bytes(prefix + payload)
        return loads_or_refuses(path)

    in_temp_folder(write)


@FUZZ
@given(inputs=arrays(), targets=st.one_of(st.none(), arrays(shape=hnp.array_shapes(min_dims=0, max_dims=2,
                                                                                    max_side=5))),
       layout=st.sampled_from(["auto", "NCHW", "NHWC"]), normalize=st.sampled_from(["auto", "none", "0.5,0.25"]),
       channels_last=st.booleans())
def test_any_numpy_arrays_as_a_data_file(inputs, targets, layout, normalize, channels_last):
    def write(folder):
        if targets is None:
            np.save(folder / "data.npy", inputs)
            path = folder / "data.npy"
        else:
            np.savez(folder / "data.npz", x=inputs, y=targets)
            path = folder / "data.npz"
        dataset = loads_or_refuses(path, layout=layout, normalize=normalize, channels_last=channels_last)
        if dataset is not None:
            assert len(dataset) == len(inputs)

    in_temp_folder(write)


@FUZZ
@given(inputs=arrays(), cut=st.floats(0.0, 0.99), compressed=st.booleans())
def test_a_truncated_numpy_file(inputs, cut, compressed):
    def write(folder):
        path = folder / "data.npz"
        (np.savez_compressed if compressed else np.savez)(path, x=inputs, y=np.zeros(len(inputs) if inputs.ndim
                                                                                      else 1))
        payload = path.read_bytes()
        path.write_bytes(payload[: int(len(payload) * cut)])
        loads_or_refuses(path)

    in_temp_folder(write)


TORCH_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                torch.int32, torch.uint8, torch.bool, torch.complex64])


@st.composite
def tensors(draw, max_dims=4):
    shape = draw(st.lists(st.integers(0, 4), max_size=max_dims))
    dtype = draw(TORCH_DTYPES)
    value = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) * 3
    if dtype.is_floating_point and value.numel() and draw(st.booleans()):
        value.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return value.to(dtype)


TORCH_OBJECTS = st.recursive(
    st.one_of(tensors(), st.integers(), st.text(max_size=5), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.sampled_from(["inputs", "targets", "x", "y", "images", "labels", "z"]),
                                            inner, max_size=3)),
    max_leaves=5)


@FUZZ
@given(obj=TORCH_OBJECTS, input_key=st.sampled_from([None, "x", "z"]), target_key=st.sampled_from([None, "y"]))
def test_any_torch_object_as_a_data_file(obj, input_key, target_key):
    def write(folder):
        torch.save(obj, folder / "data.pt")
        loads_or_refuses(folder / "data.pt", input_key=input_key, target_key=target_key)

    in_temp_folder(write)


# --- image folders ----------------------------------------------------------------------------------


def _png(size, mode) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


FILE_KINDS = st.one_of(
    st.tuples(st.just("png"), st.tuples(st.integers(1, 12), st.integers(1, 12)), st.sampled_from(["RGB", "L", "RGBA",
                                                                                                  "P", "I;16"])),
    st.tuples(st.just("bytes"), st.binary(max_size=64), st.sampled_from([".png", ".jpg", ".txt"])),
    st.tuples(st.just("truncated"), st.integers(1, 60), st.just(None)),
    st.tuples(st.just("link"), st.sampled_from(["..", ".", "../..", "missing", "../other"]), st.just(None)),
)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(["cat", "dog", "other", ".hidden"]),
                            st.lists(FILE_KINDS, max_size=4), max_size=3),
       image_size=st.sampled_from([None, 8]))
def test_any_image_folder(tree, image_size):
    def write(folder):
        root = folder / "images"
        root.mkdir()
        for name, files in tree.items():
            (root / name).mkdir()
            for index, (kind, a, b) in enumerate(files):
                target = root / name / f"{index}{b if kind == 'bytes' else '.png'}"
                if kind == "png":
                    target.write_bytes(_png(a, b))
                elif kind == "bytes":
                    target.write_bytes(a)
                elif kind == "truncated":
                    target.write_bytes(_png((8, 8), "RGB")[:a])
                else:
                    (root / name / f"link{index}").symlink_to(a)
        dataset = loads_or_refuses_images(root, image_size)
        if dataset is not None:
            assert len({path for path, _ in dataset.samples}) == len(dataset.samples)  # each file once

    in_temp_folder(write)


def loads_or_refuses_images(root, image_size):
    """An image folder loads lazily: a damaged image may fail when its sample is read, as an OSError
    that the batch loader turns into a DataError (checked in test_error_messages.py)."""
    try:
        dataset = load_data_path(root, image_size=image_size)
    except BncheckError:
        return None
    for index in range(len(dataset)):
        try:
            image, label = dataset[index]
        except OSError:
            continue
        assert image.shape[0] == 3 and (image_size is None or tuple(image.shape[1:]) == (8, 8))
    return dataset


# --- checkpoints ------------------------------------------------------------------------------------

MODEL_KEYS = list(mlp().state_dict())
KEYS = st.sampled_from(MODEL_KEYS + [f"module.{k}" for k in MODEL_KEYS] + [f"model.{k}" for k in MODEL_KEYS]
                       + ["other.weight", ""])


@FUZZ
@given(entries=st.dictionaries(KEYS, st.one_of(tensors(max_dims=2), st.integers(), st.text(max_size=3)), max_size=6),
       nest=st.sampled_from([None, "state_dict", "model", "net"]), safetensors_file=st.booleans())
def test_any_checkpoint_dict(entries, nest, safetensors_file):
    def write(folder):
        model = mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if safetensors_file:
            from safetensors.torch import save_file

            tensors_only = {k: v.contiguous() for k, v in entries.items() if isinstance(v, torch.Tensor) and k}
            assume(tensors_only)
            path = folder / "ck.safetensors"
            save_file(tensors_only, str(path))
        else:
            path = folder / "ck.pt"
            torch.save(entries if nest is None else {nest: entries, "epoch": 3}, path)
        try:
            load_checkpoint_into(model, path)
        except CheckpointError as error:
            assert "\n" not in str(error)
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched on refusal

    in_temp_folder(write)


@FUZZ
@given(payload=st.binary(max_size=200), cut=st.floats(0.0, 0.99),
       suffix=st.sampled_from([".pt", ".ckpt", ".safetensors", ".bin"]))
def test_garbage_and_truncated_checkpoints(payload, cut, suffix):
    def write(folder):
        good = folder / "good.pt"
        torch.save(mlp().state_dict(), good)
        for name, data in (("garbage", payload), ("truncated", good.read_bytes()[: int(good.stat().st_size * cut)])):
            path = folder / f"{name}{suffix}"
            path.write_bytes(data)
            with pytest.raises(CheckpointError):
                load_checkpoint_into(mlp(), path)

    in_temp_folder(write)


# --- batches and targets ----------------------------------------------------------------------------


@st.composite
def target_batches(draw, samples):
    """Targets of any dtype and shape, valid or not: class indices, out of range, negative, one-hot,
    multi-hot, regression values, NaN, lists of numbers, None."""
    kind = draw(st.sampled_from(["index", "float-index", "one-hot", "multi-hot", "regression", "out-of-range",
                                 "negative", "nan", "list", "bool", "wrong-length", "none", "2d-index", "string"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    if kind == "index":
        return torch.randint(0, 3, (samples,), generator=g)
    if kind == "float-index":
        return torch.randint(0, 3, (samples,), generator=g).float()
    if kind == "one-hot":
        return nn.functional.one_hot(torch.randint(0, 3, (samples,), generator=g), 3).float()
    if kind == "multi-hot":
        return (torch.rand(samples, 3, generator=g) > 0.5).float()
    if kind == "regression":
        return torch.randn(samples, draw(st.sampled_from([1, 3])), generator=g)
    if kind == "out-of-range":
        return torch.full((samples,), draw(st.sampled_from([3, 7, 10 ** 9])))
    if kind == "negative":
        return torch.full((samples,), -1)
    if kind == "nan":
        values = torch.randn(samples, 3, generator=g)
        values[0, 0] = math.nan
        return values
    if kind == "list":
        return [int(v) for v in torch.randint(0, 3, (samples,), generator=g)]
    if kind == "bool":
        return torch.rand(samples, generator=g) > 0.5
    if kind == "wrong-length":
        return torch.randint(0, 3, (samples + 1,), generator=g)
    if kind == "2d-index":
        return torch.randint(0, 3, (samples, 2), generator=g)
    if kind == "string":
        return ["a"] * samples
    return None


@st.composite
def batch_lists(draw):
    features = draw(st.sampled_from([4, 4, 4, 3, 5]))  # the model takes 4
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        samples = draw(st.integers(1, 6))
        g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        inputs = torch.randn(samples, features, generator=g) * 2 + 1
        if draw(st.integers(0, 9)) == 0:
            inputs = inputs.to(draw(st.sampled_from([torch.float64, torch.int64, torch.float16])))
        targets = draw(target_batches(samples))
        shape = draw(st.sampled_from(["tuple", "list", "dict", "inputs-only", "triple"]))
        batches.append({"tuple": (inputs, targets), "list": [inputs, targets],
                        "dict": {"x": inputs, "y": targets}, "inputs-only": inputs,
                        "triple": (inputs, targets, targets)}[shape])
    return batches


@FUZZ
@given(batches=batch_lists())
def test_any_batches_and_targets_give_a_report_or_an_input_error(batches):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = bncheck.diagnose(model, batches, device="cpu")
    except BncheckError as error:
        assert "\n" not in str(error)
    else:
        assert report.verdict.value in ("pass", "fail")
        assert report.data.num_samples >= 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@FUZZ
@given(samples=st.integers(0, 40), batch_size=st.one_of(st.none(), st.integers(2, 50)),
       max_samples=st.one_of(st.none(), st.integers(2, 50)), max_batches=st.one_of(st.none(), st.integers(1, 5)),
       seed=st.integers(-(2 ** 63), 2 ** 63 - 2))
def test_any_dataset_size_and_batching_options(samples, batch_size, max_samples, max_batches, seed):
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(samples, 4, generator=g) * 2 + 1, torch.randint(0, 3, (samples,), generator=g))
    try:
        report = bncheck.diagnose(mlp(), data, device="cpu", batch_size=batch_size, max_samples=max_samples,
                                  max_batches=max_batches, seed=seed)
    except DataError as error:
        assert samples < 2 or "sample" in str(error), error
    else:
        assert 2 <= report.data.num_samples <= min(samples, max_samples or samples)
