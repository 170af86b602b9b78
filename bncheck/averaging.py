"""Signs that a model's weights are an average (SWA, EMA), read from its structure.

Averaging helpers average the parameters; unless told otherwise they copy or skip the running
statistics, which then belong to other weights. bncheck reports such signs beside drifted
statistics (see ``averaged-weights-stale-stats``); the checkpoint loader adds what it saw in the file.
"""
from __future__ import annotations

import re
from typing import Any

EMA_CLASS = re.compile(r"(EMA|Ema)(?![a-z])|ExponentialMovingAverage")  # timm ModelEma/V2/V3, EMA, ...


def averaging_hints(model: Any) -> tuple[str, ...]:
    """Why ``model`` looks weight-averaged: an ``AveragedModel`` (or any module holding an ``n_averaged``
    buffer) or an EMA wrapper class around the network; empty when nothing shows."""
    named_modules = getattr(model, "named_modules", None)
    if named_modules is None:
        return ()
    hints: list[str] = []
    for name, module in named_modules():
        where = f" at {name}" if name else ""
        counter = getattr(module, "n_averaged", None)
        if counter is not None and hasattr(counter, "item") and counter.numel() == 1:
            hints.append(f"{type(module).__name__}{where} with n_averaged={int(counter.item())}")
        elif EMA_CLASS.search(type(module).__name__) and hasattr(module, "module"):
            hints.append(f"an EMA wrapper {type(module).__name__}{where}")
    return tuple(hints[:3])
