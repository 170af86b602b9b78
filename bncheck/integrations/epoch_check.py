"""What the Lightning and Keras callbacks share: their validated options, one diagnosis of the
current model that leaves the training run untouched, the values they log and the failure message."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from ..arguments import check_max_gap
from ..errors import InputError
from ..report import Report


class OnFail(str, enum.Enum):
    WARN = "warn"     # a BNCheckWarning
    STOP = "stop"     # warn, then end training after this epoch
    RAISE = "raise"   # raise BatchNormCheckFailed


@dataclass(frozen=True)
class EpochCheck:
    max_batches: int | None
    max_gap: float | None
    every_n_epochs: int
    on_fail: OnFail

    @classmethod
    def from_arguments(cls, max_batches: Any, max_gap: Any, every_n_epochs: Any, on_fail: Any) -> EpochCheck:
        """Refuse bad arguments when the callback is built, not epochs later."""
        if max_batches is not None and not _is_int_at_least(max_batches, 1):
            raise InputError(f"max_batches must be a whole number >= 1 (or None for all), got {max_batches!r}")
        check_max_gap(max_gap)
        if not _is_int_at_least(every_n_epochs, 1):
            raise InputError(f"every_n_epochs must be a whole number >= 1, got {every_n_epochs!r}")
        allowed = [choice.value for choice in OnFail]
        if on_fail not in allowed:
            raise InputError(f"on_fail must be one of {', '.join(map(repr, allowed))}, got {on_fail!r}")
        return cls(max_batches, None if max_gap is None else float(max_gap), every_n_epochs, OnFail(on_fail))

    def due(self, epoch: int) -> bool:
        """Every ``every_n_epochs``-th epoch, counting from 1 (Lightning's check_val_every_n_epoch rule)."""
        return (epoch + 1) % self.every_n_epochs == 0


def _is_int_at_least(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def diagnose_untouched(model: Any, data: Any, check: EpochCheck, *, device: Any = None, **options: Any) -> Report:
    """``bncheck.diagnose`` on the epoch's model. ``diagnose`` itself restores the model's buffers,
    modes and momentum, and the caller's random state, so the training run continues its stream."""
    import torch

    from ..diagnosis import diagnose

    device = torch.device("cpu") if device is None else torch.device(device)
    return diagnose(model, data, device=_device_text(device), max_batches=check.max_batches,
                    max_gap=check.max_gap, **options)


def _device_text(device) -> str:
    """bncheck spells devices cpu, cuda:N and mps (torch writes mps:0)."""
    return "mps" if device.type == "mps" else str(device)


def logged_values(report: Report) -> dict[str, float]:
    """The gated gap (accuracy points as a fraction, or the relative loss gap, or the disagreement),
    the largest layer drift (the report's top drift row) and 1.0/0.0 for pass/fail."""
    drifts = [layer.drift for layer in report.layers if layer.drift is not None]
    return {
        "gap": float(report.gate.value),
        "drift_max": max(drifts) if drifts else math.nan,
        "passed": 1.0 if report.passed else 0.0,
    }


def failure_message(report: Report, epoch: int) -> str:
    """One paragraph: what failed, every finding code, and the fix of the first (most severe) finding.
    ``epoch`` is numbered as the framework's progress output numbers it."""
    from ..render.format import gate_text

    text = f"bncheck: BatchNorm train/eval check failed after epoch {epoch}: {gate_text(report.gate)}."
    if not report.findings:
        return text + " No finding names a cause; run bncheck.diagnose on the model for the per-layer table."
    codes = ", ".join(dict.fromkeys(finding.code for finding in report.findings))
    top = report.findings[0]
    return f"{text} Findings: {codes}. Fix ({top.code}): {top.fix}"
