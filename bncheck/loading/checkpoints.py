"""Read checkpoint files and load their weights into a model the caller owns.

Training loops save weights in many wrappers (Lightning, DDP, ``torch.compile``,
reference scripts); this module unwraps them by pure key manipulation so the
rest of bncheck only ever sees a plain ``state_dict``.
"""
from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..errors import BackendError, CheckpointError

# What ``read_checkpoint`` may return: a state_dict, a training-checkpoint dict
# wrapping one, or (with unsafe_pickle) a whole pickled model.
RawCheckpoint = Union[Mapping, nn.Module]

# Keys under which common training code nests the model weights, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")

# Keys under which training code keeps an EMA copy of the weights (timm, YOLO, ignite/composer recipes);
# read only when none of STATE_DICT_KEYS holds weights.
EMA_STATE_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")

# Key prefixes added by wrappers: DataParallel/DDP, torch.compile, Lightning modules.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")

RUNNING_STAT_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")

# torch's weights-only unpickler reads the pickle protocols torch.save writes, not newer ones.
UNREADABLE_PICKLE = ("uses a pickle protocol that torch.load(weights_only=True) cannot read (an old torch.save "
                     "with pickle_protocol=4 or more); save it again with torch.save(obj, path)")

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


@dataclass(frozen=True)
class CheckpointLoad:
    """What happened when a checkpoint was loaded into a model."""

    path: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    missing_running_stats: tuple[str, ...]  # a finding for the diagnosis, not an error
    stripped_prefix: str
    added_prefix: str = ""                  # e.g. "module." for a model wrapped in DataParallel
    state_key: str | None = None            # the checkpoint key the weights were read from, if nested
    ema_keys_not_loaded: tuple[str, ...] = ()  # EMA weights the checkpoint also holds
    averaging_hints: tuple[str, ...] = ()   # why the loaded weights look averaged (SWA, EMA)


def read_checkpoint(path: str | Path, *, unsafe_pickle: bool = False) -> RawCheckpoint:
    """Read ``path`` without interpreting it: ``.safetensors`` via safetensors,
    anything else via ``torch.load(weights_only=not unsafe_pickle)`` on the CPU.

    ``unsafe_pickle=True`` allows pickled Python objects such as a whole model;
    unpickling executes code from the file, so only use it on trusted files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the checkpoint file itself")
    if not path.is_file():  # a FIFO would block forever, /dev/zero never ends
        raise CheckpointError(f"checkpoint {path} is not a regular file; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path, unsafe_pickle)
    if not isinstance(obj, (Mapping, nn.Module)):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}; "
            "expected a state_dict, a training checkpoint dict or a model"
        )
    return obj


def read_full_model(path: str | Path) -> nn.Module:
    """Return the whole model pickled in ``path`` (``torch.save(model, path)``).

    This always unpickles, which executes code from the file: call it only when
    the user asked for it (``--unsafe-pickle``) on a file they trust.
    """
    obj = read_checkpoint(path, unsafe_pickle=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]  # e.g. YOLOv5-style {"model": <Module>, "epoch": ...}
    if not isinstance(obj, nn.Module):
        raise CheckpointError(
            f"checkpoint {path} holds weights only, not a pickled model; "
            "build the model from code or a named spec and load these weights into it"
        )
    return obj


def extract_state_dict(obj: RawCheckpoint, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """Find the model weights in what ``read_checkpoint`` returned.

    Accepts a plain state_dict, one nested under a common key
    (:data:`STATE_DICT_KEYS`, e.g. Lightning's ``{"state_dict": ..., "epoch": ...}``, then
    :data:`EMA_STATE_KEYS`) or a full ``nn.Module``. ``source`` names the file in error messages.
    The state_dict's ``_metadata`` (module versions some modules need to load) is kept.
    """
    return find_state_dict(obj, source=source)[0]


def find_state_dict(obj: RawCheckpoint, *, source: str = "checkpoint") -> tuple[dict[str, Tensor], str | None]:
    """``extract_state_dict`` and the key the weights were nested under (None at the top level)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), None
    if _is_state_dict(obj):
        return _copy_state(obj), None
    for key in STATE_DICT_KEYS + EMA_STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return inner.state_dict(), key
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return _copy_state(inner), key
    found = ", ".join(str(k) for k in list(obj)[:8]) or "nothing"
    raise CheckpointError(
        f"{source}: no state_dict found (top-level keys: {found}); "
        f"expected tensors at the top level or under one of: {', '.join(STATE_DICT_KEYS)}"
    )


def _copy_state(state: Mapping) -> "OrderedDict[str, Tensor]":
    """A copy that keeps ``_metadata``: MNASNet and others read their version from it when loading."""
    copied = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        copied._metadata = metadata
    return copied


def choose_prefix(checkpoint_keys: Iterable[str], model_keys: Iterable[str]) -> str:
    """The wrapper prefix whose removal makes the most checkpoint keys match the
    model; ``""`` when stripping does not help (ties go to the shorter prefix)."""
    checkpoint_keys = list(checkpoint_keys)
    model_keys = set(model_keys)
    candidates = sorted(_wrapper_prefixes(checkpoint_keys), key=lambda p: (len(p), p))
    return max(candidates, key=lambda p: len(model_keys.intersection(_stripped_keys(checkpoint_keys, p))))


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from the keys that have it; other keys stay as they are.
    On a clash the stripped key wins, since it is the one that was chosen. ``_metadata`` follows the keys."""
    if not prefix:
        return _copy_state(state_dict)
    kept = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return _with_metadata({**kept, **stripped}, state_dict, lambda key: _strip_module_path(key, prefix))


def choose_added_prefix(checkpoint_keys: Iterable[str], model_keys: Iterable[str]) -> str:
    """The wrapper prefix of the model's keys (``module.`` of DataParallel, ...) whose addition to every
    checkpoint key makes the most keys match; ``""`` when adding does not help."""
    checkpoint_keys = set(checkpoint_keys)
    model_keys = list(model_keys)
    candidates = sorted(_wrapper_prefixes(model_keys), key=lambda p: (len(p), p))
    return max(candidates, key=lambda p: len(checkpoint_keys.intersection(_stripped_keys(model_keys, p))))


def add_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Put ``prefix`` in front of every key (and of ``_metadata``'s module paths)."""
    if not prefix:
        return _copy_state(state_dict)
    return _with_metadata({prefix + k: v for k, v in state_dict.items()}, state_dict,
                          lambda key: prefix + key if key else prefix[:-1])


def match_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with the wrapper prefix removed (or added) that best matches ``model``'s keys."""
    model_state = model.state_dict()
    stripped = strip_prefix(state_dict, choose_prefix(state_dict, model_state))
    return add_prefix(stripped, choose_added_prefix(stripped, model_state))


def _strip_module_path(key: str, prefix: str) -> str:
    if key == prefix[:-1]:
        return ""
    return key[len(prefix):] if key.startswith(prefix) else key


def _with_metadata(state: dict, source: Mapping, move) -> "OrderedDict[str, Tensor]":
    result = OrderedDict(state)
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        result._metadata = OrderedDict((move(key), value) for key, value in metadata.items())
    return result


def load_checkpoint_into(model: nn.Module, path: str | Path, *, unsafe_pickle: bool = False) -> CheckpointLoad:
    """Load the weights in ``path`` into ``model`` (modified in place, non-strict).

    Raises :class:`CheckpointError` when no key matches or a shape differs; the
    model is untouched in both cases. Missing BatchNorm running statistics are
    reported in the result, not raised: they are a finding of the diagnosis.
    """
    source = f"checkpoint {path}"
    raw = read_checkpoint(path, unsafe_pickle=unsafe_pickle)
    state_dict, state_key = find_state_dict(raw, source=source)
    model_state = model.state_dict()
    prefix = choose_prefix(state_dict, model_state)
    matched = strip_prefix(state_dict, prefix)
    added = choose_added_prefix(matched, model_state)
    matched = add_prefix(matched, added)
    if getattr(matched, "_metadata", None) is None:
        # safetensors files and hand-copied dicts carry no module versions: the model's own are the best guess.
        matched._metadata = getattr(model_state, "_metadata", None)
    _check_fits(matched, model_state, source)
    try:
        model.load_state_dict(matched, strict=False)
    except RuntimeError as exc:  # e.g. a module's own _load_from_state_dict refuses
        raise CheckpointError(f"{source} does not load into the model: {_short(exc)}") from exc
    # Compared by key rather than taken from load_state_dict, which hides a missing
    # num_batches_tracked (BatchNorm fills in 0 for old checkpoints).
    missing = tuple(k for k in model_state if k not in matched)
    return CheckpointLoad(
        path=str(path),
        missing=missing,
        unexpected=tuple(k for k in matched if k not in model_state),
        missing_running_stats=tuple(k for k in missing if k.endswith(RUNNING_STAT_SUFFIXES)),
        stripped_prefix=prefix,
        added_prefix=added,
        state_key=state_key,
        ema_keys_not_loaded=_ema_keys_beside(raw, state_key),
        averaging_hints=_averaging_hints(state_dict, state_key),
    )


def _ema_keys_beside(raw: RawCheckpoint, state_key: str | None) -> tuple[str, ...]:
    if not isinstance(raw, Mapping) or _is_state_dict(raw):
        return ()
    return tuple(k for k in EMA_STATE_KEYS if k != state_key and isinstance(raw.get(k), (Mapping, nn.Module)))


def _averaging_hints(state_dict: Mapping[str, Tensor], state_key: str | None) -> tuple[str, ...]:
    """What in the file says the weights are averaged: an EMA key, or an AveragedModel's ``n_averaged``."""
    hints = []
    if state_key in EMA_STATE_KEYS:
        hints.append(f"weights read from the checkpoint's {state_key!r}, an EMA copy")
    counter = next((v for k, v in state_dict.items() if k == "n_averaged" or k.endswith(".n_averaged")), None)
    if counter is not None and counter.numel() == 1:
        hints.append(f"the checkpoint is an AveragedModel's state with n_averaged={int(counter.item())}")
    return tuple(hints)


def _check_fits(state_dict: Mapping[str, Tensor], model_state: Mapping[str, Tensor], source: str) -> None:
    shared = [k for k in state_dict if k in model_state]
    if not shared:
        raise CheckpointError(
            f"{source}: none of its {len(state_dict)} keys match the model "
            f"(checkpoint has {next(iter(state_dict), 'no keys')}, model has {next(iter(model_state), 'no keys')}); "
            "pass a checkpoint saved from this architecture"
        )
    for key in shared:
        if is_lazy(model_state[key]):
            continue  # an uninitialized Lazy* parameter takes the checkpoint's shape
        theirs, ours = tuple(state_dict[key].shape), tuple(model_state[key].shape)
        if theirs != ours:
            raise CheckpointError(
                f"{source}: shape mismatch at {key}: checkpoint {theirs}, model {ours}; "
                "build the model with the shapes it was trained with (e.g. the number of classes)"
            )


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _wrapper_prefixes(keys: Iterable[str]) -> set[str]:
    """Every run of wrapper prefixes that starts some key, e.g. ``model._orig_mod.``."""
    found = {""}
    for key in keys:
        prefix = ""
        while True:
            part = next((p for p in WRAPPER_PREFIXES if key.startswith(prefix + p)), None)
            if part is None:
                break
            prefix += part
            found.add(prefix)
    return found


def _stripped_keys(keys: Iterable[str], prefix: str) -> set[str]:
    return {k[len(prefix):] if k.startswith(prefix) else k for k in keys}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise BackendError(f"reading {path} needs safetensors; pip install safetensors") from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file ({exc})") from exc


def newer_pickle_protocol(path: Path) -> bool:
    """A legacy-format torch.save file pickled with protocol 4 or 5 (it starts with PROTO 4 or 5)."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    return len(start) == 2 and start[0] == 0x80 and start[1] >= 4


def quiet_torch_load(path: Path, *, weights_only: bool) -> object:
    """``torch.load`` without its warnings (pickle protocol, weights_only defaults): what went wrong
    reaches the user as bncheck's one-line error, and a file that loads needs no lines of advice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, unsafe_pickle: bool) -> object:
    try:
        return quiet_torch_load(path, weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        refused = _UNSUPPORTED_GLOBAL.search(str(exc))
        if not unsafe_pickle and refused:
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects ({refused.group(1)}), not just tensors; "
                "pass --unsafe-pickle only if you trust the file, because unpickling runs code from it"
            ) from exc
        if not unsafe_pickle and "Unsupported operand" in str(exc) and newer_pickle_protocol(path):
            raise CheckpointError(
                f"checkpoint {path} {UNREADABLE_PICKLE}; pass --unsafe-pickle only if you trust the file") from exc
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_short(exc)}); pass a file written by torch.save or safetensors"
        ) from exc
    except (ModuleNotFoundError, AttributeError) as exc:
        # Only reachable with unsafe_pickle: the pickle names code that is not importable here.
        raise CheckpointError(
            f"checkpoint {path} refers to code that cannot be imported here ({exc}); "
            "run bncheck where the code that saved the model is importable"
        ) from exc
    except Exception as exc:  # a text file or garbage bytes can fail anywhere in the unpickler
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_short(exc)}); pass a file written by torch.save or safetensors"
        ) from exc


def _short(exc: Exception) -> str:
    """One line out of torch's multi-paragraph messages: the unpickler's reason
    when there is one, else the first line."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
