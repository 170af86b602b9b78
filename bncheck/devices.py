"""Parsing ``--device auto|cpu|cuda[:N]`` into a ``torch.device``."""
from __future__ import annotations

import re

from .errors import InputError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d{1,4})?|mps)$")  # torch cannot parse a longer index


def validate_device_text(text: str) -> str:
    """Check the spelling without importing torch (used by the CLI at parse time)."""
    if not _DEVICE.match(text):
        raise InputError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


def resolve_device(text: str = "auto", *, local_rank: int | None = None):
    """``auto`` picks CUDA when available; in a multi-process run a bare ``cuda`` means this
    process's GPU, ``cuda:LOCAL_RANK``."""
    import torch

    validate_device_text(text)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda" and local_rank is not None:
        text = f"cuda:{local_rank}"
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: MPS is not available here; use --device cpu")
    return device
