"""Result records. Frozen dataclasses with no formatting: renderers live in ``render/``."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Verdict(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"

    def __str__(self) -> str:
        return self.value  # print(report.verdict) shows "fail", as the JSON does


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class ModeMetrics:
    loss: float | None
    accuracy: float | None
    num_samples: int | None = None   # samples these metrics were measured on


@dataclass(frozen=True)
class MetricsSet:
    eval: ModeMetrics
    train: ModeMetrics                       # model.train() with dropout (and stochastic depth) off
    train_with_dropout: ModeMetrics | None   # model.train() as is, when the model has dropout (may be a subset)


@dataclass(frozen=True)
class Gap:
    accuracy: float | None       # train-mode minus eval-mode
    loss: float | None           # eval-mode minus train-mode
    relative_loss: float | None  # loss gap / train-mode loss
    accuracy_ci: tuple[float, float] | None = None       # 95% interval of ``accuracy`` (paired outcomes)
    relative_loss_ci: tuple[float, float] | None = None  # 95% interval of ``relative_loss`` (per-sample losses)


@dataclass(frozen=True)
class Gate:
    metric: str       # "accuracy", "relative_loss" or "disagreement"
    value: float
    threshold: float
    passed: bool
    interval: tuple[float, float] | None = None   # 95% interval of value


@dataclass(frozen=True)
class ChannelStats:
    true_mean: tuple[float, ...]
    true_var: tuple[float, ...]
    true_var_unbiased: tuple[float, ...]
    running_mean: tuple[float, ...]
    running_var: tuple[float, ...]


@dataclass(frozen=True)
class Attribution:
    """Eval-mode result with only this layer's running statistics replaced by the true ones."""

    loss: float | None
    accuracy: float | None
    recovered_share: float | None   # share of the eval/train gap this fix closes


@dataclass(frozen=True)
class AttributionSummary:
    layers: tuple[str, ...]          # the attributed (most drifted) layers
    top_fixed: Attribution           # those layers fixed together
    all_fixed: Attribution           # every norm layer fixed: how much of the gap running stats explain
    baseline: ModeMetrics            # eval mode on the attribution batches
    target: ModeMetrics              # train-mode BN on the same batches
    num_batches: int
    num_forwards: int


@dataclass(frozen=True)
class LayerReport:
    name: str
    type: str
    framework: str
    per_instance: bool               # InstanceNorm: running stats average per-instance statistics
    num_features: int | None
    momentum: float | None           # as the user wrote it (Keras convention for Keras layers)
    update_weight: float | None      # weight of each new batch in the moving average
    eps: float
    tracks_running_stats: bool
    num_batches_tracked: int | None
    initial_weight: float | None     # weight the moving average still gives its initial value
    params_frozen: bool
    training: bool                   # normalises with batch statistics as the model was handed over
    calls_per_forward: float
    batch_samples: float | None      # samples per channel in a full batch (the largest seen)
    mean_shift_max: float | None
    mean_shift_mean: float | None
    var_ratio_max: float | None
    var_ratio_min: float | None
    drift: float | None              # mean over channels of the 2-Wasserstein drift, in true std units
    drift_max: float | None
    running_stats_at_init: bool      # running_mean all 0 and running_var all 1
    running_stats_corrupt: bool      # NaN/inf in the running statistics, or a negative variance
    batch_mean_spread: float | None  # std of batch means / true std, mean over channels
    dropout_var_ratio: float | None  # input variance with dropout on / off, mean over channels
    channels: ChannelStats | None = None
    attribution: Attribution | None = None
    order: int | None = None         # position in forward order (first call); None when never called
    batch_stats_in_train: bool = True  # normalises with batch statistics under model.train()
    running_var_min: float | None = None  # smallest running variance over channels (known without data)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    layers: tuple[str, ...]
    evidence: dict[str, Any]
    message: str
    fix: str


@dataclass(frozen=True)
class DataSummary:
    num_samples: int
    num_batches: int
    batch_size: int | None
    reshuffled: bool
    seed: int
    mean_majority_share: float | None
    num_classes_seen: int | None
    stopped_early: bool = False          # --quick settled the verdict before the data ran out
    num_samples_available: int | None = None  # samples the plan held (num_samples when not stopped early)
    world_size: int = 1                  # processes the data was sharded over


@dataclass(frozen=True)
class Report:
    verdict: Verdict
    task: str
    framework: str
    device: str
    metrics: MetricsSet
    gap: Gap
    gate: Gate
    agreement: float | None
    output_divergence: float | None
    layers: tuple[LayerReport, ...]
    findings: tuple[Finding, ...]
    data: DataSummary
    attribution: AttributionSummary | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS
