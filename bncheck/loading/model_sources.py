"""Build a model from a spec such as ``torchvision:resnet18`` or ``timm:resnet50``.

Models are always built with random weights (``weights=None`` /
``pretrained=False``): bncheck never downloads anything; real weights come
from a checkpoint the user passes.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from ..errors import BackendError, InputError, summarize

SOURCES = ("torchvision", "timm")


def is_named_model_spec(text: str) -> bool:
    """True for ``SOURCE:NAME`` with a known source (an empty NAME is reported when building)."""
    source, sep, _name = text.partition(":")
    return bool(sep) and source in SOURCES


def build_named_model(spec: str, *, num_classes: int | None = None) -> nn.Module:
    """Build the classification model named by ``spec`` with random weights.

    ``num_classes`` replaces the default head size (1000 for ImageNet models).
    """
    if not is_named_model_spec(spec):
        raise InputError(f"model spec {spec!r}: expected torchvision:NAME or timm:NAME")
    if num_classes is not None and num_classes < 1:
        raise InputError(f"num_classes must be at least 1, got {num_classes}")
    source, _, name = spec.partition(":")
    name = name.strip()
    if not name:
        raise InputError(f"{spec!r} names no model; use e.g. {source}:resnet18")
    if source == "torchvision":
        return _build_torchvision(name, num_classes)
    return _build_timm(name, num_classes)


def _build_torchvision(name: str, num_classes: int | None) -> nn.Module:
    try:
        import torchvision.models as models
    except ImportError as exc:
        raise BackendError("torchvision:NAME models need torchvision; pip install torchvision") from exc
    available = models.list_models(module=models)  # classification models only
    if name not in available:
        raise InputError(_unknown_name_message("torchvision", name, available))
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return models.get_model(name, weights=None, **extra)
    except (TypeError, ValueError, RuntimeError, MemoryError) as exc:  # RuntimeError: a head too big to allocate
        raise InputError(_build_failed("torchvision", name, extra, exc)) from exc


def _build_timm(name: str, num_classes: int | None) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise BackendError("timm:NAME models need timm; pip install timm") from exc
    if not timm.is_model(name):
        raise InputError(_unknown_name_message("timm", name, timm.list_models()))
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **extra)
    except (TypeError, ValueError, RuntimeError, MemoryError) as exc:
        raise InputError(_build_failed("timm", name, extra, exc)) from exc


def _build_failed(source: str, name: str, extra: dict, exc: BaseException) -> str:
    hint = "; pass the number of classes the checkpoint was trained with" if extra else ""
    return f"{source}:{name} cannot be built with {extra or 'defaults'}: {summarize(exc, 200)}{hint}"


def _unknown_name_message(source: str, name: str, available: Sequence[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(available), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else (
        f"{len(available)} models are available, e.g. {', '.join(sorted(available)[:3])}"
    )
    return f"unknown {source} model {name!r}; {hint}"
