"""Number formatting shared by the human-readable renderers."""
from __future__ import annotations


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value == float("inf"):
        return "inf"
    if abs(value) >= 1000 or (value != 0 and abs(value) < 10 ** -digits):
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def signed_points(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f} pts"


def bar(value: float | None, scale: float, width: int = 20) -> str:
    if value is None or scale <= 0:
        return ""
    filled = max(0, min(width, round(width * value / scale)))
    return "█" * filled + "·" * (width - filled)


def drift_style(value: float | None) -> str:
    from ..findings import DRIFT_HIGH, DRIFT_NOTICEABLE

    if value is None:
        return "dim"
    return "red" if value > DRIFT_HIGH else "yellow" if value > DRIFT_NOTICEABLE else "green"


def gate_text(gate) -> str:
    if gate.metric == "accuracy":
        return f"accuracy gap {signed_points(gate.value)} (max {gate.threshold * 100:.1f} pts)"
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
