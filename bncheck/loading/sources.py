"""From command-line words to a model, its weights and its data.

``MODEL`` is ``path/model.py[:factory]``, ``torchvision:NAME``, ``timm:NAME`` or a
``.keras`` file; ``--checkpoint`` loads weights on top; ``--data`` replaces
model.py's data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, InputError
from .checkpoints import EMA_STATE_KEYS, RUNNING_STAT_SUFFIXES



@dataclass(frozen=True)
class DataOptions:
    path: str | None = None
    image_size: int | None = None
    normalize: str = "auto"
    layout: str = "auto"
    input_key: str | None = None
    target_key: str | None = None


@dataclass(frozen=True)
class LoadedInputs:
    model: Any
    data: Any
    loss_fn: Callable | None
    framework: str
    missing_running_stats: tuple[str, ...] = ()   # layer names whose buffers the checkpoint lacked
    missing_update_counts: tuple[str, ...] = ()   # layers whose statistics loaded but num_batches_tracked did not
    notes: tuple[str, ...] = field(default_factory=tuple)
    averaging_hints: tuple[str, ...] = ()          # why the checkpoint's weights look averaged (SWA, EMA)


def is_keras_file(spec: str) -> bool:
    """A Keras model file (``.keras``, legacy ``.h5``/``.hdf5``); a ``.weights.h5`` too, so that
    loading it explains that weights need the model from model.py."""
    return spec.lower().endswith((".keras", ".h5", ".hdf5"))


def load_inputs(
    model_spec: str,
    *,
    need_data: bool = True,
    checkpoint: str | None = None,
    unsafe_pickle: bool = False,
    num_classes: int | None = None,
    data: DataOptions = DataOptions(),
) -> LoadedInputs:
    notes: list[str] = []
    loss_fn = None
    user_data = None
    from .model_sources import build_named_model, is_named_model_spec

    if is_named_model_spec(model_spec):
        model = build_named_model(model_spec, num_classes=num_classes)
        if checkpoint is None:
            notes.append(f"{model_spec} was built with random weights (no --checkpoint)")
    elif is_keras_file(model_spec):
        from .keras_files import load_keras_model

        model = load_keras_model(model_spec)  # imports Keras on the PyTorch backend
    elif is_pickled_model_file(model_spec):
        model = _read_pickled_model(model_spec, unsafe_pickle)
    else:
        from .user_module import load_user_module

        module = load_user_module(model_spec, need_data=need_data and data.path is None)
        model, user_data, loss_fn = module.model, module.data, module.loss_fn
    from ..frameworks.keras_adapter import is_keras_model  # never imports Keras itself

    framework = "keras" if is_keras_model(model) else "torch"
    if framework == "keras":
        from ..frameworks.keras_adapter import import_keras

        import_keras()  # BackendError if model.py imported Keras on another backend
    missing: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()
    if checkpoint is not None:
        if framework == "keras":
            from .keras_files import load_keras_weights

            load_keras_weights(model, checkpoint)
        else:
            missing, counters, load_notes, hints = _load_torch_checkpoint(model, checkpoint, unsafe_pickle)
            notes += load_notes
    loaded_data = user_data
    if data.path is not None:
        from .data_sources import load_data_path

        loaded_data = load_data_path(data.path, image_size=data.image_size, normalize=data.normalize,
                                     layout=data.layout, input_key=data.input_key, target_key=data.target_key,
                                     channels_last=framework == "keras")
    if need_data and loaded_data is None:
        raise DataError(f"no data for {model_spec}: pass --data PATH")
    return LoadedInputs(model, loaded_data, loss_fn, framework, missing, counters, tuple(notes), hints)


PICKLED_MODEL_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


def is_pickled_model_file(spec: str) -> bool:
    return spec.lower().endswith(PICKLED_MODEL_SUFFIXES)


def _read_pickled_model(path: str, unsafe_pickle: bool):
    """A whole model saved with ``torch.save(model)``: only with --unsafe-pickle, since unpickling runs code."""
    import sys

    if not Path(path).exists():
        raise InputError(f"model file not found: {path}")
    if not unsafe_pickle:
        raise InputError(f"MODEL {path} is a checkpoint: pass a model.py (or torchvision:NAME) with --checkpoint "
                         f"{path}, or --unsafe-pickle if it holds a whole pickled model you trust")
    from .checkpoints import read_full_model

    # The pickle names the classes' modules; the user's code is usually importable from here.
    sys.path.insert(0, str(Path.cwd()))
    try:
        return read_full_model(path)
    finally:
        sys.path.remove(str(Path.cwd()))


def _load_torch_checkpoint(model, path: str, unsafe_pickle: bool):
    from .checkpoints import load_checkpoint_into

    result = load_checkpoint_into(model, path, unsafe_pickle=unsafe_pickle)
    notes = []
    if result.stripped_prefix:
        notes.append(f"checkpoint keys had prefix {result.stripped_prefix!r}, stripped to fit the model")
    if result.added_prefix:
        notes.append(f"checkpoint keys lacked the model's prefix {result.added_prefix!r} (a DataParallel-style "
                     "wrapper), added to fit the model")
    if result.state_key in EMA_STATE_KEYS:
        notes.append(f"weights read from the checkpoint's {result.state_key!r} (an EMA copy of the weights)")
    if result.ema_keys_not_loaded:
        key = result.ema_keys_not_loaded[0]
        notes.append(f"the checkpoint also holds EMA weights under {key!r}, not loaded; to diagnose them, save them "
                     f"alone: torch.save(torch.load(path)[{key!r}], 'ema.pt')")
    running = set(result.missing_running_stats)
    other_missing = [k for k in result.missing if k not in running]
    if other_missing:
        notes.append(f"checkpoint lacks {len(other_missing)} model keys (first: {other_missing[0]}); "
                     "they keep the model's initial values")
    if result.unexpected:
        notes.append(f"checkpoint has {len(result.unexpected)} keys the model does not use "
                     f"(first: {result.unexpected[0]})")
    # Old checkpoints lack num_batches_tracked alone; that loses no statistics, only their update counts.
    layers = tuple(sorted({_layer_of(k) for k in running if not k.endswith(".num_batches_tracked")}))
    counters = tuple(sorted(_layer_of(k) for k in running if k.endswith(".num_batches_tracked")
                            and _layer_of(k) not in layers))
    lost = sorted(k for k in running if _layer_of(k) in layers)
    if lost:
        notes.append(f"checkpoint lacks {len(lost)} running-statistics buffers (first: {lost[0]})")
    if counters:
        notes.append(f"checkpoint lacks num_batches_tracked of {len(counters)} norm layers (first: {counters[0]}), "
                     "as older checkpoints do: their update counts are unknown, their statistics are judged "
                     "from the values")
    return layers, counters, notes, result.averaging_hints


def _layer_of(key: str) -> str:
    for suffix in RUNNING_STAT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key
