"""Number formatting and the drift scale shared by the human-readable renderers. Every formatter takes
NaN and inf: corrupt running statistics produce them."""
from __future__ import annotations

import math

from ..findings import DRIFT_HIGH, DRIFT_NOTICEABLE

# Drift bars run on one fixed scale in every format: 0 to DRIFT_SCALE true standard deviations,
# full at or beyond it, so a healthy model draws short bars whatever its worst layer.
DRIFT_SCALE = 1.0
DRIFT_MARK = "¦"  # the finding threshold; distinct from a table's │ borders
DRIFT_LEGEND = (f"drift bar: 0 to {DRIFT_SCALE:g} std (+ beyond); {DRIFT_MARK} at {DRIFT_HIGH:g}, where findings start; "
                "░ NaN")
_EIGHTHS = "▏▎▍▌▋▊▉"


def pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "NaN" if math.isnan(value) else f"{value * 100:.1f}%"


def relative_text(relative: float) -> str:
    """A relative loss gap: a percentage, or a factor once eval loss is over ten times train-mode loss."""
    if math.isfinite(relative) and relative > 9:
        factor = 1 + relative
        return f"eval loss {factor:,.0f}x train-mode" if factor >= 1000 else f"eval loss {factor:.3g}x train-mode"
    return f"relative {pct(relative)}"


def num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if abs(value) >= 1000 or (value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def signed_points(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "NaN" if math.isnan(value) else f"{value * 100:+.1f} pts"


def drift_fill(value: float | None) -> float | None:
    """Share of a drift bar that ``value`` fills on the fixed scale; None when there is no number."""
    if value is None or math.isnan(value):
        return None
    return min(max(value, 0.0) / DRIFT_SCALE, 1.0)


def drift_bar(value: float | None, width: int = 10) -> str:
    """A text bar on the fixed scale, in eighths of a cell, with a mark at the finding threshold."""
    if value is None:
        return ""
    fill = drift_fill(value)
    if fill is None:
        cells = "░" * width
    else:
        full, part = divmod(round(8 * width * fill), 8)
        cells = ("█" * full + (_EIGHTHS[part - 1] if part else "")).ljust(width, "·")
    mark = round(width * DRIFT_HIGH / DRIFT_SCALE)
    return cells[:mark] + DRIFT_MARK + cells[mark:] + ("+" if value > DRIFT_SCALE else "")


def drift_style(value: float | None) -> str:
    if value is None:
        return "dim"
    if not math.isfinite(value):
        return "red"  # NaN or inf: corrupt running statistics
    return "red" if value > DRIFT_HIGH else "yellow" if value > DRIFT_NOTICEABLE else "green"


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


def interval_text(gate) -> str:
    """The gated metric's 95% interval, in the gate's own units."""
    if gate.interval is None:
        return ""
    low, high = gate.interval
    if gate.metric == "accuracy":
        return f"{low * 100:+.1f} to {high * 100:+.1f} pts"
    return f"{pct(low)} to {pct(high)}"


def data_text(data) -> str:
    """Samples, batches and how they were drawn, on one line."""
    text = (f"{data.num_samples} samples in {data.num_batches} batch{'' if data.num_batches == 1 else 'es'}"
            f"{f' of {data.batch_size}' if data.batch_size else ''}"
            f" ({'seeded shuffle, seed ' + str(data.seed) if data.reshuffled else 'batches as your loader yields them'})")
    if data.world_size > 1:
        text += f", sharded over {data.world_size} processes"
    return text


def stopped_text(data) -> str | None:
    if not data.stopped_early:
        return None
    of = f" of {data.num_samples_available}" if data.num_samples_available else ""
    return f"stopped after {data.num_samples}{of} samples: verdict settled (--quick)"


def train_stats_text(layer) -> str:
    """What the layer normalises with under model.train(): its batch, or its running statistics."""
    return "batch" if layer.batch_stats_in_train else "running"


def kept_by_reason(kept) -> dict[str, list[str]]:
    """Recalibration's kept layers, grouped by why they were kept."""
    grouped: dict[str, list[str]] = {}
    for layer in kept:
        grouped.setdefault(layer.reason, []).append(layer.name)
    return grouped
