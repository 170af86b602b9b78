"""Importing a user's ``model.py`` by path, with one clear error per failure."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, ModelFileError

MODEL_NAMES = ("build_model", "model")
DATA_NAMES = ("get_dataloader", "dataloader", "dataset")


@dataclass(frozen=True)
class UserModule:
    path: Path
    model: Any
    data: Any
    loss_fn: Callable | None


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``path/to/model.py:factory`` -> (path, factory); a Windows drive colon is not a separator."""
    if spec.endswith(":"):
        raise ModelFileError(f"{spec!r} names no factory after the colon; use path.py:build_model or drop the colon")
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isidentifier():
        return Path(head), tail
    return Path(spec), None


def _import_file(path: Path):
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a file: {path}; pass the path of a model.py")
    name = "bncheck_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {path}: use a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so model.py can import its neighbours
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ModelFileError(f"syntax error in {path} line {error.lineno}: {error.msg}") from error
    except (Exception, SystemExit) as error:  # sys.exit() in model.py must not become bncheck's exit code
        raise ModelFileError(f"error while importing {path}: {type(error).__name__}: {error}") from error
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _call(path: Path, name: str, factory: Callable) -> Any:
    try:
        return factory()
    except (Exception, SystemExit) as error:
        raise ModelFileError(f"{name}() in {path} raised {type(error).__name__}: {error}") from error


def load_user_module(spec: str, *, need_data: bool = True) -> UserModule:
    """Import ``model.py`` and build its model (and data, unless ``need_data`` is False).

    No ``__pycache__`` is written beside the user's files: bncheck only reads them."""
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        return _load_user_module(spec, need_data)
    finally:
        sys.dont_write_bytecode = previous


def _load_user_module(spec: str, need_data: bool) -> UserModule:
    path, factory_name = split_spec(spec)
    os.environ.setdefault("KERAS_BACKEND", "torch")  # an `import keras` in model.py gets the backend bncheck drives
    module = _import_file(path)
    if factory_name is not None:
        if not hasattr(module, factory_name):
            raise ModelFileError(f"{path} has no {factory_name!r}")
        candidates = (factory_name,)
    else:
        candidates = MODEL_NAMES
    name = next((n for n in candidates if hasattr(module, n)), None)
    if name is None:
        raise ModelFileError(f"{path} must define build_model() returning the model (or a module-level `model`)")
    value = getattr(module, name)
    model = _call(path, name, value) if callable(value) and not _is_model(value) else value
    if model is None:
        raise ModelFileError(f"{name}() in {path} returned None; return the model")
    data = None
    if need_data:
        data_name = next((n for n in DATA_NAMES if hasattr(module, n)), None)
        if data_name is None:
            raise DataError(f"{path} must define get_dataloader() (or `dataloader`/`dataset`), or pass --data")
        value = getattr(module, data_name)
        data = _call(path, data_name, value) if data_name == "get_dataloader" else value
        if data_name == "dataset" and isinstance(data, list):
            data = SampleList(data)  # a list named `dataset` holds samples, not batches
        if data is None:
            raise DataError(f"{data_name} in {path} is None; return a DataLoader or Dataset")
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise ModelFileError(f"loss_fn in {path} is not callable")
    return UserModule(path, model, data, loss_fn)


def _is_model(value: Any) -> bool:
    """An nn.Module or keras.Model is callable but is the model itself, not a factory."""
    module = sys.modules.get("torch.nn")
    if module is not None and isinstance(value, module.Module):
        return True
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(value, getattr(keras, "Model", ()))


class SampleList:
    """A plain list of samples used as a map-style dataset (a bare list would read as a list of batches)."""

    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]
