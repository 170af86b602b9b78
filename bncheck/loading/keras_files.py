"""Reading and writing Keras model files (``.keras``, legacy ``.h5``) and weight
files (``.weights.h5``). Keras itself is imported lazily, on the PyTorch backend."""
from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, summarize
from ..frameworks.keras_adapter import import_keras

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
WEIGHTS_SUFFIX = ".weights.h5"


def _one_line(exc: BaseException) -> str:
    """Keras messages span several lines (the cause is often on the second)."""
    return f"{type(exc).__name__}: {summarize(exc)}"


def load_keras_model(path: str | os.PathLike, *, custom_objects: dict[str, Any] | None = None,
                     safe_mode: bool = True):
    """Load a whole model (architecture and weights) for inference.

    ``compile=False``: bncheck only runs forward passes, so the optimizer, losses
    and metrics (and the custom objects they may need) are not restored.
    With ``safe_mode`` (the default) a file with serialized Python lambdas is refused.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(WEIGHTS_SUFFIX) or not name.endswith(MODEL_SUFFIXES):
        raise CheckpointError(f"{path}: not a Keras model file (expected {', '.join(MODEL_SUFFIXES)}; "
                              f"a {WEIGHTS_SUFFIX} file needs the model from model.py)")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if name.endswith(".keras") and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .keras archive (a .keras file is a zip file)")
    keras = import_keras()
    try:
        model = keras.saving.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    except Exception as exc:
        if "safe_mode" in str(exc):  # Keras' advice names a loading argument bncheck does not offer
            raise CheckpointError(
                f"cannot load Keras model {path}: it holds Python code (a Lambda layer), which bncheck never runs "
                "from a file; build the model in a model.py (build_model()) and pass this file as --checkpoint "
                "for its weights") from exc
        raise CheckpointError(f"cannot load Keras model {path}: {_one_line(exc)}") from exc
    steps = saved_optimizer_steps(path)
    if steps is not None:
        model._bncheck_optimizer_steps = steps  # read by the adapter in place of optimizer.iterations
    return model


def saved_optimizer_steps(path: str | os.PathLike) -> int | None:
    """The optimizer's step count stored in a ``.keras`` or ``.weights.h5`` file saved after ``compile``
    and ``fit`` (``optimizer/vars/0`` of its weights, Keras 3's ``iterations``), without building the
    optimizer; None when the file holds no such integer scalar."""
    try:
        import h5py

        if zipfile.is_zipfile(path):  # .keras: the weights are a member of the archive
            with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member:
                return _steps_in(h5py.File(io.BytesIO(member.read()), "r"))
        return _steps_in(h5py.File(path, "r"))  # .weights.h5
    except Exception:  # legacy .h5 layout, no weights member, no h5py: unknown
        return None


def _steps_in(weights) -> int | None:
    with weights:
        dataset = weights.get("optimizer/vars/0")
        if dataset is None or dataset.shape != () or dataset.dtype.kind not in "iu":
            return None
        return int(dataset[()])


def load_keras_weights(model, path: str | os.PathLike) -> None:
    """Load a ``.weights.h5`` file (or the weights of a whole-model ``.keras`` file, e.g. when only
    model.py knows its custom layers) into ``model``, built by the user's factory."""
    path = Path(path)
    if not path.name.lower().endswith((WEIGHTS_SUFFIX, ".keras")):
        raise CheckpointError(f"{path}: Keras weights must be a {WEIGHTS_SUFFIX} (or .keras) file")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():  # bncheck needs no optimizer state: no warning when it is skipped
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(path)
    except Exception as exc:
        raise CheckpointError(f"{path} does not fit the model: {_one_line(exc)}") from exc
    steps = saved_optimizer_steps(path)
    if steps is not None:
        model._bncheck_optimizer_steps = steps  # read by the adapter in place of optimizer.iterations
