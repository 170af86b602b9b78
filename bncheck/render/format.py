"""Number formatting shared by the human-readable renderers. Every formatter takes NaN and inf:
corrupt running statistics produce them."""
from __future__ import annotations

import math


def _nonfinite(value: float) -> str | None:
    if math.isnan(value):
        return "nan"
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else None


def pct(value: float | None) -> str:
    return "n/a" if value is None else _nonfinite(value) or f"{value * 100:.1f}%"


def num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return _nonfinite(value)
    if abs(value) >= 1000 or (value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def signed_points(value: float | None) -> str:
    return "n/a" if value is None else _nonfinite(value) or f"{value * 100:+.1f} pts"


def bar(value: float | None, scale: float, width: int = 20) -> str:
    if value is None or math.isnan(value) or not scale > 0:
        return ""
    if math.isinf(value) or math.isinf(scale):
        filled = width if math.isinf(value) else 0
    else:
        filled = max(0, min(width, round(width * value / scale)))
    return "█" * filled + "·" * (width - filled)


def drift_style(value: float | None) -> str:
    from ..findings import DRIFT_HIGH, DRIFT_NOTICEABLE

    if value is None:
        return "dim"
    return "red" if math.isnan(value) or value > DRIFT_HIGH else "yellow" if value > DRIFT_NOTICEABLE else "green"


def gate_text(gate) -> str:
    if gate.metric == "accuracy":
        return f"accuracy gap {signed_points(gate.value)} (max {gate.threshold * 100:.1f} pts)"
    if gate.metric == "nonfinite_eval_outputs":
        return f"eval-mode outputs hold NaN or inf in {pct(gate.value)} of the batches (max 0%)"
    if gate.metric == "disagreement":
        return f"train/eval prediction disagreement {pct(gate.value)} (max {pct(gate.threshold)})"
    return f"relative loss gap {pct(gate.value)} (max {pct(gate.threshold)})"


def momentum_text(layer) -> str:
    if layer.momentum is None:
        return "None (cumulative)"
    return f"{layer.momentum:g}"


def shown_layers(layers, options):
    return list(layers) if options.all_layers else list(layers)[: options.top]
