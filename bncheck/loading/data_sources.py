"""Turn a data path (image folder, ``.pt``/``.pth``, ``.npz``, ``.npy``) into a
map-style dataset of model-ready tensors.

Labelled datasets yield ``(input, target)``; unlabelled ones yield the input
tensor alone. Tensor files are trusted to be preprocessed already: they are
only converted (uint8 to [0, 1], layout, dtype) and normalized when asked.
"""
from __future__ import annotations

import enum
import math
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..batches import UnlabelledDataset
from ..errors import BackendError, DataError, InputError, summarize
from .checkpoints import UNREADABLE_PICKLE, newer_pickle_protocol, quiet_torch_load
from .image_folders import image_folder_without_loops
from .numpy_files import check_numpy_file


class Layout(enum.Enum):
    """How a 4-D array is stored on disk."""

    AUTO = "auto"
    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std``; a single value applies to every channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# Key pairs tried, in order, when a dict or .npz names its arrays.
DEFAULT_KEYS = (("inputs", "targets"), ("x", "y"), ("images", "labels"))
SUPPORTED_KINDS = "an image folder (one subfolder per class), .pt/.pth, .npz or .npy"
_CHANNEL_COUNTS = (1, 3, 4)

NormalizeOption = Union[str, Normalization, None]


def parse_normalization(text: str) -> Normalization | None:
    """``imagenet``, ``none`` (returns None), ``MEAN,STD`` or ``M1,M2,M3;S1,S2,S3``."""
    word = text.strip().lower()
    if word == "imagenet":
        return IMAGENET
    if word == "none":
        return None
    try:
        if ";" in word:
            mean_text, std_text = word.split(";")
            mean = tuple(float(v) for v in mean_text.split(","))
            std = tuple(float(v) for v in std_text.split(","))
        else:
            mean_value, std_value = (float(v) for v in word.split(","))
            mean, std = (mean_value,), (std_value,)
    except ValueError:
        raise InputError(
            f"normalize {text!r}: expected imagenet, none, MEAN,STD or M1,M2,M3;S1,S2,S3"
        ) from None
    if len(mean) != len(std) or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise InputError(f"normalize {text!r}: needs as many means as stds, finite numbers, and every std above 0")
    return Normalization(mean=mean, std=std)


def parse_layout(text: str) -> Layout:
    value = text.strip()
    try:
        return Layout("auto" if value.lower() == "auto" else value.upper())
    except ValueError:
        raise InputError(f"layout {text!r}: expected auto, NCHW or NHWC") from None


def load_data_path(
    path: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    normalize: NormalizeOption = "auto",
    layout: str | Layout = "auto",
    channels_last: bool = False,
    input_key: str | None = None,
    target_key: str | None = None,
) -> Dataset:
    """Read ``path`` into a map-style dataset.

    - A folder in ImageFolder layout (``ROOT/CLASS/IMAGE``) yields
      ``(image, class_index)``, resized and center-cropped to ``image_size`` when
      given; its samples must then share one size (checked).
    - ``.pt``/``.pth`` (read with ``weights_only=True``) may hold an
      ``(inputs, targets)`` tuple, a dict of named tensors, a ``TensorDataset``
      or one tensor of inputs. ``.npz`` holds named arrays, ``.npy`` inputs only.
      Dicts and ``.npz`` are read via ``input_key``/``target_key``, else the
      first of :data:`DEFAULT_KEYS` present; ``.npz`` falls back to its first
      two arrays in name order.

    Without targets the dataset is an :class:`UnlabelledDataset` whose items are
    bare input tensors. ``normalize="auto"`` means ImageNet statistics for image
    folders and none for tensor files. ``layout`` says how 4-D arrays are
    stored; they come out NCHW, or NHWC when ``channels_last`` (Keras models).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    layout = layout if isinstance(layout, Layout) else parse_layout(layout)
    size = _parse_image_size(image_size)
    if path.is_dir():
        if input_key or target_key:
            raise DataError(f"data {path}: --input-key/--target-key apply only to .pt/.pth and .npz files")
        norm = _resolve_normalization(normalize, default=IMAGENET)
        return _load_image_folder(path, size, norm, channels_last)
    if not path.is_file():  # a FIFO would block forever, /dev/zero never ends
        raise DataError(f"data {path} is not a regular file; pass {SUPPORTED_KINDS}")
    inputs, targets = _read_tensors(path, input_key, target_key)
    norm = _resolve_normalization(normalize, default=None)
    return _tensor_dataset(path, inputs, targets, size, norm, layout, channels_last)


def check_uniform_shapes(dataset: Dataset, *, limit: int = 256) -> tuple[int, ...]:
    """Return the input shape shared by up to ``limit`` evenly spaced samples;
    raise :class:`DataError` naming the first two that differ."""
    count = len(dataset)
    if count == 0:
        raise DataError("data holds no samples")
    step = max(1, math.ceil(count / limit))
    first: tuple[int, ...] | None = None
    for index in range(0, count, step):
        shape = _sample_shape(dataset, index)
        if first is None:
            first = shape
        elif shape != first:
            raise DataError(
                f"samples differ in shape: sample 0 is {first}, sample {index} is {shape}; "
                "pass --image-size to resize"
            )
    return first


def _sample_shape(dataset: Dataset, index: int) -> tuple[int, ...]:
    try:
        item = dataset[index]
    except Exception as exc:  # PIL: UnidentifiedImageError (an OSError), DecompressionBombError, ...
        samples = getattr(dataset, "samples", None)
        where = f" ({samples[index][0]})" if samples else ""
        raise DataError(f"sample {index}{where} cannot be read: {summarize(exc, 200)}; fix or remove it") from exc
    sample = item[0] if isinstance(item, (tuple, list)) else item
    if not hasattr(sample, "shape"):
        raise DataError(f"sample {index} is a {type(sample).__name__}, not a tensor")
    return tuple(sample.shape)


def _resolve_normalization(option: NormalizeOption, *, default: Normalization | None) -> Normalization | None:
    if isinstance(option, str):
        return default if option.strip().lower() == "auto" else parse_normalization(option)
    return option


def _parse_image_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"image size {image_size!r}: expected a positive size or (height, width)")
    return size


# --- image folders ---------------------------------------------------------


class _ToChannelsLast:
    """CHW -> HWC; a class rather than a lambda so DataLoader workers can pickle it."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.permute(1, 2, 0).contiguous()


def _load_image_folder(
    path: Path, size: tuple[int, int] | None, norm: Normalization | None, channels_last: bool
) -> Dataset:
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise BackendError("image folders need torchvision and pillow; pip install torchvision pillow") from exc
    if norm is not None and len(norm.mean) not in (1, 3):
        raise InputError(f"normalize has {len(norm.mean)} values per statistic; images are RGB, pass 1 or 3")
    steps: list[Any] = []
    if size is not None:
        # Resize the short side, then crop, as ImageNet evaluation does; (h, w) resizes exactly.
        steps += [transforms.Resize(size[0] if size[0] == size[1] else size), transforms.CenterCrop(size)]
    steps.append(transforms.ToTensor())
    if norm is not None:
        steps.append(transforms.Normalize(norm.mean, norm.std))
    if channels_last:
        steps.append(_ToChannelsLast())
    try:
        dataset = image_folder_without_loops(datasets)(str(path), transform=transforms.Compose(steps))
    except FileNotFoundError as exc:
        raise DataError(
            f"data folder {path} holds no images in class subfolders; expected {path}/CLASS/IMAGE.png"
        ) from exc
    if size is None:
        check_uniform_shapes(dataset)
    return dataset


# --- tensor files ----------------------------------------------------------


def _read_tensors(path: Path, input_key: str | None, target_key: str | None) -> tuple[Tensor, Tensor | None]:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return _split_torch_object(_torch_load_data(path), path, input_key, target_key)
    if suffix == ".npz":
        arrays = _numpy_load(path)
        return _pick_named(arrays, path, input_key, target_key, by_name_fallback=True)
    if suffix == ".npy":
        if input_key or target_key:
            raise DataError(f"data {path}: a .npy file holds one unnamed array; drop --input-key/--target-key")
        return _numpy_load(path)["array"], None
    raise DataError(f"data {path}: unsupported kind {suffix or '(no suffix)'!r}; pass {SUPPORTED_KINDS}")


def _torch_load_data(path: Path) -> object:
    try:
        # TensorDataset only holds tensors; allowing it keeps weights_only's safety.
        with torch.serialization.safe_globals([TensorDataset]):
            return quiet_torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc) and newer_pickle_protocol(path):
            raise DataError(f"data {path} {UNREADABLE_PICKLE}") from exc
        if "Unsupported global" in str(exc):
            raise DataError(
                f"data {path} holds pickled Python objects that are not loaded, because unpickling runs code; "
                "save tensors instead, e.g. torch.save((inputs, targets), path)"
            ) from exc
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # garbage bytes fail anywhere in the unpickler: IndexError, EOFError, ...
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"data {path} cannot be read by torch.load ({type(exc).__name__}: {summarize(exc, 160)}); "
                     "pass a file written by torch.save, e.g. torch.save((inputs, targets), path)")


def _numpy_load(path: Path) -> dict[str, Tensor]:
    check_numpy_file(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"array": _from_numpy(loaded, path)}
        with loaded:
            return {name: _from_numpy(loaded[name], path) for name in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError) as exc:
        raise DataError(f"data {path} cannot be read by numpy ({summarize(exc)}); write it again with "
                        "numpy.save/savez") from exc


def _from_numpy(array: np.ndarray, path: Path) -> Tensor:
    try:
        return torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))  # keeps 0-d arrays 0-d
    except TypeError as exc:
        raise DataError(f"data {path}: arrays of dtype {array.dtype} are not numeric tensors") from exc


def _split_torch_object(
    obj: object, path: Path, input_key: str | None, target_key: str | None
) -> tuple[Tensor, Tensor | None]:
    if isinstance(obj, Mapping):
        return _pick_named(obj, path, input_key, target_key, by_name_fallback=False)
    if input_key or target_key:
        raise DataError(f"data {path} holds a {type(obj).__name__}, not a dict; drop --input-key/--target-key")
    if isinstance(obj, Tensor):
        return obj, None
    parts = obj.tensors if isinstance(obj, TensorDataset) else obj
    if isinstance(parts, (tuple, list)) and len(parts) in (1, 2) and all(isinstance(p, Tensor) for p in parts):
        return parts[0], (parts[1] if len(parts) == 2 else None)
    raise DataError(
        f"data {path} holds a {type(obj).__name__}; expected a tensor, an (inputs, targets) tuple, "
        "a dict of tensors or a TensorDataset"
    )


def _pick_named(
    named: Mapping, path: Path, input_key: str | None, target_key: str | None, *, by_name_fallback: bool
) -> tuple[Tensor, Tensor | None]:
    keys = ", ".join(map(str, named)) or "none"
    for key, option in ((input_key, "--input-key"), (target_key, "--target-key")):
        if key is not None and key not in named:
            raise DataError(f"data {path} has no array {key!r} (it has: {keys}); pass one of those as {option}")
    inputs_name, targets_name = input_key, target_key
    if inputs_name is None:
        pair = next((p for p in DEFAULT_KEYS if p[0] in named), None)
        if pair is not None:
            inputs_name, targets_name = pair[0], target_key or (pair[1] if pair[1] in named else None)
        elif by_name_fallback and any(k != target_key for k in named):
            names = sorted(k for k in named if k != target_key)
            inputs_name = names[0]
            targets_name = target_key or (names[1] if len(names) > 1 else None)
        else:
            raise DataError(f"data {path} has arrays {keys} but none named inputs or x; pass --input-key")
    inputs, targets = named[inputs_name], (named[targets_name] if targets_name else None)
    for name, value in ((inputs_name, inputs), (targets_name, targets)):
        if (value is not None or name == inputs_name) and not isinstance(value, Tensor):
            raise DataError(f"data {path}: {name!r} holds a {type(value).__name__}, not a tensor")
    return inputs, targets


def _tensor_dataset(
    path: Path,
    inputs: Tensor,
    targets: Tensor | None,
    size: tuple[int, int] | None,
    norm: Normalization | None,
    layout: Layout,
    channels_last: bool,
) -> Dataset:
    if inputs.dim() == 0 or len(inputs) == 0:
        raise DataError(f"data {path} holds no samples")
    if targets is not None and (targets.dim() == 0 or len(targets) != len(inputs)):
        raise DataError(
            f"data {path}: {len(inputs)} inputs but targets of shape {tuple(targets.shape)}; "
            "pass one target per input"
        )
    inputs = _to_model_layout(_as_float_inputs(inputs), layout, channels_last, path)
    channel_axis = -1 if channels_last and inputs.dim() == 4 else 1
    _check_image_size(inputs, size, channel_axis, path)
    if norm is not None:
        inputs = _normalize(inputs, norm, channel_axis, path)
    if targets is None:
        return UnlabelledDataset(inputs)
    return TensorDataset(inputs, _as_targets(targets))


def _as_float_inputs(inputs: Tensor) -> Tensor:
    if inputs.dtype == torch.uint8:
        return inputs.float() / 255.0  # 8-bit images, as ToTensor scales them
    if inputs.dtype == torch.float64:
        return inputs.float()  # numpy's default dtype; model weights are float32
    return inputs


def _as_targets(targets: Tensor) -> Tensor:
    if targets.dtype == torch.bool or not (targets.is_floating_point() or targets.is_complex()):
        return targets.long()  # class indices, as cross-entropy expects
    return targets.float()


def _to_model_layout(inputs: Tensor, layout: Layout, channels_last: bool, path: Path) -> Tensor:
    if inputs.dim() != 4:
        if layout is not Layout.AUTO:
            raise DataError(
                f"data {path}: layout {layout.value} applies to 4-D image arrays, "
                f"inputs have shape {tuple(inputs.shape)}; pass layout auto"
            )
        return inputs
    stored = layout
    if stored is Layout.AUTO:
        looks_nhwc = inputs.shape[-1] in _CHANNEL_COUNTS and inputs.shape[1] not in _CHANNEL_COUNTS
        stored = Layout.NHWC if looks_nhwc else Layout.NCHW
    wanted = Layout.NHWC if channels_last else Layout.NCHW
    if stored is wanted:
        return inputs
    order = (0, 3, 1, 2) if wanted is Layout.NCHW else (0, 2, 3, 1)
    return inputs.permute(*order).contiguous()


def _check_image_size(inputs: Tensor, size: tuple[int, int] | None, channel_axis: int, path: Path) -> None:
    if size is None:
        return
    spatial = tuple(inputs.shape[1:3]) if channel_axis == -1 else tuple(inputs.shape[2:4])
    if inputs.dim() != 4 or spatial != size:
        raise DataError(
            f"data {path}: inputs of shape {tuple(inputs.shape)} are not {size[0]}x{size[1]} images; "
            "tensor files are used as stored, so resize them or drop --image-size"
        )


def _normalize(inputs: Tensor, norm: Normalization, channel_axis: int, path: Path) -> Tensor:
    if inputs.dim() < 2 or not inputs.is_floating_point():
        raise DataError(f"data {path}: cannot normalize inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}")
    channels = inputs.shape[channel_axis]
    if len(norm.mean) not in (1, channels):
        raise DataError(f"data {path}: normalize gives {len(norm.mean)} values but inputs have {channels} channels")
    view = [1] * inputs.dim()
    view[channel_axis] = -1
    mean = torch.tensor(norm.mean, dtype=inputs.dtype).view(view)
    std = torch.tensor(norm.std, dtype=inputs.dtype).view(view)
    return (inputs - mean) / std
