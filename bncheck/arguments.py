"""Checks of the library's numeric arguments at the boundary, so that a wrong type or range is an
:class:`InputError` naming the argument rather than a TypeError or OverflowError from deep inside."""
from __future__ import annotations

import math
import numbers

from .errors import InputError

# torch.Generator.manual_seed takes a signed or unsigned 64-bit value; a subset draw uses seed + 1.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 2


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer(name: str, value, *, minimum: int | None = None) -> None:
    """None, or a whole number (at least ``minimum``); a float such as 2.5 is refused, not truncated."""
    if value is None:
        return
    if not _is_integer(value):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")


def check_seed(seed) -> None:
    if not _is_integer(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise InputError(f"seed must be a whole number from {SEED_MIN} to {SEED_MAX}, got {seed!r}")


def check_batching(*, batch_size, seed, max_batches, max_samples) -> None:
    """The arguments that decide the batches are whole numbers (their ranges are checked where used)."""
    check_integer("batch_size", batch_size)
    check_seed(seed)
    check_integer("max_batches", max_batches)
    check_integer("max_samples", max_samples)


def check_max_gap(max_gap) -> None:
    """None (the default for the task) or a fraction from 0 to 1; NaN would fail every gate, and
    a value above 1 is almost always points typed for a fraction (5 for 0.05), which always passes."""
    if max_gap is None:
        return
    if not isinstance(max_gap, numbers.Real) or isinstance(max_gap, bool) or math.isnan(max_gap) \
            or not 0 <= max_gap <= 1:
        raise InputError(f"max_gap must be a fraction from 0 to 1 (0.05 is 5 pts), got {max_gap!r}")
