"""The verdict: the gap between eval mode and train mode, its interval, the gate and ``--quick``'s rule.

Pure functions of a pass's :class:`~bncheck.outcomes.Outcomes`. The gated metric is the
train-minus-eval accuracy gap, or for tasks without accuracy the relative loss gap
``(eval - train) / train``, or without targets the share of samples whose predictions differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .intervals import GATE_TOLERANCE, Interval, settles, sequential_z, z_value
from .outcomes import (
    EVAL,
    TRAIN,
    Outcomes,
    accuracy_gap_interval,
    disagreement_interval,
    mode_metrics,
    relative_loss_interval,
)
from .report import Gap, Gate, MetricsSet
from .tasks import Task

DEFAULT_MAX_GAP = 0.05                # accuracy points (as a fraction) or train/eval prediction disagreement
DEFAULT_MAX_RELATIVE_LOSS_GAP = 0.10  # for tasks without accuracy: (eval loss - train loss) / train loss
MIN_QUICK_SAMPLES = 256               # --quick never settles on fewer samples than this


def gap_of(metrics: MetricsSet, outcomes: Outcomes) -> Gap:
    ev, tr = metrics.eval, metrics.train
    accuracy = tr.accuracy - ev.accuracy if tr.accuracy is not None and ev.accuracy is not None else None
    loss = ev.loss - tr.loss if ev.loss is not None and tr.loss is not None else None
    relative = loss / max(abs(tr.loss), 1e-12) if loss is not None else None
    z = z_value()
    return Gap(accuracy, loss, relative,
               accuracy_gap_interval(outcomes, z) if accuracy is not None else None,
               relative_loss_interval(outcomes, z) if relative is not None else None)


def gate_of(task: Task, outcomes: Outcomes, max_gap: float | None, z: float | None = None) -> Gate:
    """The gated metric, its threshold, whether it passes, and its interval at ``z`` (95% by default)."""
    z = z_value() if z is None else z
    eval_m, train_m = mode_metrics(outcomes, EVAL), mode_metrics(outcomes, TRAIN)
    if task is Task.LABEL_FREE:
        n = outcomes.get("agree.n")
        value = 1.0 - outcomes.get("agree.a") / n if n else 0.0
        return _gate("disagreement", value, _threshold(max_gap, DEFAULT_MAX_GAP), disagreement_interval(outcomes, z))
    if eval_m is not None and train_m is not None and eval_m.accuracy is not None and train_m.accuracy is not None:
        value = train_m.accuracy - eval_m.accuracy
        return _gate("accuracy", value, _threshold(max_gap, DEFAULT_MAX_GAP), accuracy_gap_interval(outcomes, z))
    value = 0.0
    if eval_m is not None and train_m is not None and eval_m.loss is not None and train_m.loss is not None:
        value = (eval_m.loss - train_m.loss) / max(abs(train_m.loss), 1e-12)
    threshold = _threshold(max_gap, DEFAULT_MAX_RELATIVE_LOSS_GAP)
    return _gate("relative_loss", value, threshold, relative_loss_interval(outcomes, z))


def _threshold(max_gap: float | None, default: float) -> float:
    return default if max_gap is None else max_gap


def _gate(metric: str, value: float, threshold: float, interval: Interval | None) -> Gate:
    # A NaN gap (NaN eval-mode outputs) is no pass: the comparison is False for NaN.
    return Gate(metric, value, threshold, bool(value <= threshold + GATE_TOLERANCE), interval)


@dataclass(frozen=True)
class StopRule:
    """``--quick``: stop once the gated metric's interval lies wholly on one side of the threshold.

    The interval at the k-th look uses :func:`~bncheck.intervals.sequential_z`, so looking after
    every batch keeps the chance of a wrong early verdict below 5% overall.
    """

    max_gap: float | None
    min_samples: int = MIN_QUICK_SAMPLES

    def settled(self, task: Task | None, outcomes: Outcomes, look: int) -> bool:
        if task is None or outcomes.get(f"{TRAIN}.samples") < self.min_samples:
            return False
        gate = gate_of(task, outcomes, self.max_gap, sequential_z(look))
        if gate.interval is None or not all(map(math.isfinite, gate.interval)):
            return False
        return settles(gate.interval, gate.threshold) is not None
