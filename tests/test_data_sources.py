"""Data paths of every supported kind become datasets of model-ready tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from bncheck.errors import DataError, InputError
from bncheck.loading.data_sources import (
    IMAGENET,
    Layout,
    Normalization,
    UnlabelledDataset,
    check_uniform_shapes,
    load_data_path,
    parse_layout,
    parse_normalization,
)

COLOURS = {"cat": (255, 0, 128), "dog": (0, 255, 64)}


def write_image_folder(root, sizes=((8, 8),) * 3):
    """Two classes, one flat colour each, one PNG per entry of ``sizes``."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")
    return root


def rgb_tensor(colour):
    return torch.tensor(colour, dtype=torch.float32) / 255.0


# --- image folders ---------------------------------------------------------


def test_image_folder_without_normalization(tmp_path):
    dataset = load_data_path(write_image_folder(tmp_path / "imgs"), normalize="none")
    assert len(dataset) == 6
    image, label = dataset[0]
    assert (image.shape, label) == ((3, 8, 8), 0)
    assert torch.allclose(image[:, 4, 4], rgb_tensor(COLOURS["cat"]))
    assert dataset[5][1] == 1
    assert torch.allclose(dataset[5][0][:, 0, 0], rgb_tensor(COLOURS["dog"]))


def test_image_folder_uses_imagenet_statistics_by_default(tmp_path):
    image, _ = load_data_path(write_image_folder(tmp_path / "imgs"))[0]
    mean, std = torch.tensor(IMAGENET.mean), torch.tensor(IMAGENET.std)
    assert torch.allclose(image[:, 0, 0], (rgb_tensor(COLOURS["cat"]) - mean) / std, atol=1e-6)


def test_image_folder_custom_normalization_and_resize(tmp_path):
    dataset = load_data_path(write_image_folder(tmp_path / "imgs"), image_size=4, normalize="0.5,0.25")
    image, _ = dataset[3]
    assert image.shape == (3, 4, 4)
    assert torch.allclose(image[:, 2, 2], (rgb_tensor(COLOURS["dog"]) - 0.5) / 0.25, atol=1e-6)


def test_image_folder_channels_last(tmp_path):
    image, _ = load_data_path(write_image_folder(tmp_path / "imgs"), normalize="none", channels_last=True)[0]
    assert image.shape == (8, 8, 3)
    assert torch.allclose(image[1, 1], rgb_tensor(COLOURS["cat"]))


def test_image_folder_with_mixed_sizes_needs_image_size(tmp_path):
    root = write_image_folder(tmp_path / "imgs", sizes=((8, 8), (8, 8), (6, 10)))
    with pytest.raises(DataError) as info:
        load_data_path(root)
    assert str(info.value) == (
        "samples differ in shape: sample 0 is (3, 8, 8), sample 2 is (3, 10, 6); pass --image-size to resize"
    )
    dataset = load_data_path(root, image_size=8)
    assert check_uniform_shapes(dataset) == (3, 8, 8)


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"holds no images in class subfolders; expected .*/flat/CLASS/IMAGE.png"):
        load_data_path(tmp_path / "flat")


# --- .pt files -------------------------------------------------------------


def test_pt_tuple(tmp_path):
    inputs, targets = torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32)
    torch.save((inputs, targets), tmp_path / "data.pt")
    dataset = load_data_path(tmp_path / "data.pt")
    assert isinstance(dataset, TensorDataset) and len(dataset) == 5
    x, y = dataset[2]
    assert torch.equal(x, inputs[2])  # already NCHW and float: untouched, not normalized
    assert y.dtype == torch.int64 and int(y) == 2


@pytest.mark.parametrize(
    ("input_key", "target_key", "keys"),
    [(None, None, ("inputs", "targets")), (None, None, ("x", "y")), ("feats", "labels", ("feats", "labels"))],
)
def test_pt_dict(tmp_path, input_key, target_key, keys):
    inputs, targets = torch.randn(4, 6), torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64)
    torch.save({keys[0]: inputs, keys[1]: targets, "meta": torch.zeros(1)}, tmp_path / "data.pth")
    dataset = load_data_path(tmp_path / "data.pth", input_key=input_key, target_key=target_key)
    x, y = dataset[1]
    assert torch.equal(x, inputs[1])
    assert y.dtype == torch.float32 and float(y) == 1.5


def test_pt_dict_with_unknown_keys_asks_for_input_key(tmp_path):
    torch.save({"feats": torch.zeros(2, 3)}, tmp_path / "d.pt")
    with pytest.raises(DataError) as info:
        load_data_path(tmp_path / "d.pt")
    assert str(info.value) == f"data {tmp_path / 'd.pt'} has arrays feats but none named inputs or x; pass --input-key"
    with pytest.raises(DataError, match=r"has no array 'pixels' \(it has: feats\); pass one of those as --input-key"):
        load_data_path(tmp_path / "d.pt", input_key="pixels")


def test_pt_tensor_dataset_loads_with_weights_only(tmp_path):
    inputs, targets = torch.randn(3, 2), torch.tensor([1, 0, 1])
    torch.save(TensorDataset(inputs, targets), tmp_path / "ds.pt")
    dataset = load_data_path(tmp_path / "ds.pt")
    x, y = dataset[0]
    assert torch.equal(x, inputs[0]) and int(y) == 1


def test_pt_single_tensor_is_unlabelled(tmp_path):
    inputs = torch.randn(4, 3, 5, 5)
    torch.save(inputs, tmp_path / "x.pt")
    dataset = load_data_path(tmp_path / "x.pt")
    assert isinstance(dataset, UnlabelledDataset)
    assert torch.equal(dataset[3], inputs[3])


def test_pt_with_pickled_objects_is_refused(tmp_path):
    torch.save({"inputs": torch.zeros(2, 2), "note": Normalization((0.0,), (1.0,))}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="holds pickled Python objects that are not loaded, because unpickling runs code"):
        load_data_path(tmp_path / "evil.pt")


def test_explicit_normalization_applies_to_tensor_files(tmp_path):
    inputs = torch.stack([torch.full((2, 2), v) for v in (0.2, 0.4, 0.6)]).unsqueeze(0).repeat(2, 1, 1, 1)
    torch.save(inputs, tmp_path / "x.pt")
    dataset = load_data_path(tmp_path / "x.pt", normalize="0.1,0.2,0.3;0.1,0.2,0.3")
    assert torch.allclose(dataset[0], torch.ones(3, 2, 2))  # (v - v/2) / (v/2) per channel
    with pytest.raises(DataError, match="normalize gives 2 values but inputs have 3 channels"):
        load_data_path(tmp_path / "x.pt", normalize="0.1,0.2;0.5,0.5")


# --- numpy files -----------------------------------------------------------


def test_npz_nhwc_uint8_becomes_nchw_floats(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 0], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    dataset = load_data_path(tmp_path / "d.npz")
    x, y = dataset[1]
    assert x.shape == (3, 5, 6) and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255)
    assert y.dtype == torch.int64 and int(y) == 1


def test_npz_channels_last_keeps_nhwc(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=images, y=np.array([0, 1]))
    x, _ = load_data_path(tmp_path / "d.npz", channels_last=True)[0]
    assert torch.allclose(x, torch.from_numpy(images[0]).float() / 255)


def test_npz_nchw_float_first_two_arrays_by_name(tmp_path):
    inputs = np.random.default_rng(2).standard_normal((3, 3, 4, 4))  # float64
    np.savez(tmp_path / "d.npz", inputs, np.array([2, 0, 1]))  # saved as arr_0, arr_1
    dataset = load_data_path(tmp_path / "d.npz")
    x, y = dataset[0]
    assert x.dtype == torch.float32 and x.shape == (3, 4, 4)
    assert torch.allclose(x, torch.from_numpy(inputs[0]).float())
    assert int(y) == 2


def test_explicit_layout_overrides_detection(tmp_path):
    # (N, 3, 4, 3) is ambiguous; auto reads it as NCHW, NHWC says otherwise.
    inputs = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    np.save(tmp_path / "x.npy", inputs)
    assert load_data_path(tmp_path / "x.npy")[0].shape == (3, 4, 3)
    as_nhwc = load_data_path(tmp_path / "x.npy", layout="NHWC")[0]
    assert torch.equal(as_nhwc, torch.from_numpy(inputs[0]).permute(2, 0, 1))


def test_npy_is_unlabelled(tmp_path):
    inputs = np.ones((3, 1, 2, 2), dtype=np.float32)
    np.save(tmp_path / "x.npy", inputs)
    dataset = load_data_path(tmp_path / "x.npy")
    assert isinstance(dataset, UnlabelledDataset) and len(dataset) == 3
    assert torch.equal(dataset[2], torch.ones(1, 2, 2))


def test_image_size_must_match_tensor_files(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), dtype=np.float32))
    assert len(load_data_path(tmp_path / "x.npy", image_size=8)) == 2
    with pytest.raises(DataError, match=r"inputs of shape \(2, 3, 8, 8\) are not 4x4 images"):
        load_data_path(tmp_path / "x.npy", image_size=4)


# --- errors and parsing ----------------------------------------------------


def test_missing_empty_and_unsupported(tmp_path):
    with pytest.raises(DataError) as info:
        load_data_path(tmp_path / "nope")
    assert str(info.value) == f"data not found: {tmp_path / 'nope'}"
    np.save(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.float32))
    with pytest.raises(DataError, match="holds no samples"):
        load_data_path(tmp_path / "empty.npy")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError) as info:
        load_data_path(tmp_path / "d.csv")
    assert str(info.value) == (
        f"data {tmp_path / 'd.csv'}: unsupported kind '.csv'; pass an image folder "
        "(one subfolder per class), .pt/.pth, .npz or .npy"
    )


def test_targets_must_match_inputs(tmp_path):
    torch.save((torch.zeros(3, 2), torch.zeros(2)), tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"3 inputs but targets of shape \(2,\); pass one target per input"):
        load_data_path(tmp_path / "d.pt")


def test_check_uniform_shapes_on_plain_lists():
    assert check_uniform_shapes([torch.zeros(2, 2), torch.ones(2, 2)]) == (2, 2)
    with pytest.raises(DataError, match="no samples"):
        check_uniform_shapes([])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("imagenet", IMAGENET),
        ("none", None),
        ("0.5,0.25", Normalization((0.5,), (0.25,))),
        ("0.5,0.5,0.5;0.2,0.2,0.2", Normalization((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))),
    ],
)
def test_parse_normalization(text, expected):
    assert parse_normalization(text) == expected


@pytest.mark.parametrize("text", ["imagenett", "0.5", "0.5,0.1,0.2", "0.5,0.5;0.2", "0.5,0"])
def test_parse_normalization_rejects(text):
    with pytest.raises(InputError, match=f"normalize '{text}'"):
        parse_normalization(text)


def test_parse_layout():
    assert [parse_layout(t) for t in ("auto", "nchw", "NHWC")] == [Layout.AUTO, Layout.NCHW, Layout.NHWC]
    with pytest.raises(InputError, match="layout 'CHW': expected auto, NCHW or NHWC"):
        parse_layout("CHW")
