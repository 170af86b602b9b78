"""What the model predicts and how to score it: task detection, loss and accuracy.

Pure functions over output and target tensors; accumulation is weighted by the
number of scored elements so the result does not depend on how data is batched.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import InputError, ShapeMismatchError


class Task(enum.Enum):
    CLASSIFICATION = "classification"   # class indices or one-hot targets
    BINARY = "binary"                   # one logit per sample, 0/1 targets
    SEGMENTATION = "segmentation"       # (N, C, *) logits, (N, *) class maps
    MULTILABEL = "multilabel"           # multi-hot targets shaped like the logits
    REGRESSION = "regression"           # float targets shaped like the output
    CUSTOM = "custom"                   # loss_fn from model.py
    LABEL_FREE = "label-free"           # no targets


@dataclass(frozen=True)
class Metrics:
    loss: float | None
    accuracy: float | None
    num_samples: int


def mode_metrics(metrics: Metrics | None):
    """The report's view of one mode's metrics."""
    from .report import ModeMetrics

    return None if metrics is None else ModeMetrics(metrics.loss, metrics.accuracy)


def select_output(output: Any, *, output_index: int | None = None, output_key: str | None = None) -> torch.Tensor:
    """Pick the prediction tensor from whatever the model returned."""
    if isinstance(output, list) and len(output) > 1 and all(isinstance(item, dict) for item in output):
        raise InputError(_per_sample_dicts_message(output))  # one dict per image: a detection model
    if output_key is not None:
        if isinstance(output, dict) and output_key in output:
            return select_output(output[output_key])
        if hasattr(output, output_key):
            return select_output(getattr(output, output_key))
        raise InputError(f"model output has no key or attribute {output_key!r}")
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        if not output:
            raise InputError("model returned an empty tuple; pass --output-index")
        index = 0 if output_index is None else output_index
        if not -len(output) <= index < len(output):
            raise InputError(f"--output-index {index} is out of range for a model output of {len(output)} items")
        return select_output(output[index])
    if isinstance(output, dict):
        for key in ("logits", "out", "output", "outputs", "pred", "preds"):
            if key in output:
                return select_output(output[key])
        raise InputError(f"model returned a dict with keys {sorted(output)[:6]}; pass --output-key")
    if hasattr(output, "logits"):
        return select_output(output.logits)
    raise InputError(f"cannot use a model output of type {type(output).__name__}; return a tensor or pass --output-key")


def _per_sample_dicts_message(output) -> str:
    keys = ", ".join(sorted(str(k) for k in output[0])[:6])
    return (f"the model returned a list of {len(output)} dicts ({keys}), one per image, as detection models do; "
            "bncheck compares prediction tensors, so no --output-key or --output-index applies: diagnose the "
            "backbone (a model.py whose build_model() returns it, e.g. model.backbone, with --output-key for one "
            "feature map), or a forward that returns a tensor, judged label-free by train/eval agreement")


def _is_one_hot(targets: torch.Tensor) -> bool:
    return bool(((targets == 0) | (targets == 1)).all() and (targets.sum(dim=1) == 1).all())


def infer_task(outputs: torch.Tensor, targets: torch.Tensor | None, *, has_loss_fn: bool = False) -> Task:
    """Decide the task from the first batch's output and targets."""
    if targets is None:
        return Task.LABEL_FREE
    if has_loss_fn:
        return Task.CUSTOM
    out_shape, tgt_shape = tuple(outputs.shape), tuple(targets.shape)
    single_logit = outputs.dim() == 1 or (outputs.dim() == 2 and out_shape[1] == 1)
    if single_logit and targets.numel() == out_shape[0] and bool(((targets == 0) | (targets == 1)).all()):
        return Task.BINARY
    if not targets.is_floating_point() and not targets.dtype == torch.bool:
        if outputs.dim() >= 2 and tgt_shape == out_shape[:1]:
            return Task.CLASSIFICATION
        if outputs.dim() >= 3 and tgt_shape == out_shape[:1] + out_shape[2:]:
            return Task.SEGMENTATION
        if tgt_shape == out_shape and outputs.dim() == 2:
            return Task.MULTILABEL
        raise ShapeMismatchError(
            f"model output {out_shape} does not fit integer targets {tgt_shape}: expected targets "
            f"{out_shape[:1]} (class indices) or {out_shape} (multi-hot)"
        )
    if tgt_shape == out_shape:
        if outputs.dim() == 2 and out_shape[1] > 1 and _is_one_hot(targets):
            return Task.CLASSIFICATION
        if outputs.dim() == 2 and out_shape[1] > 1 and bool(((targets == 0) | (targets == 1)).all()):
            return Task.MULTILABEL
        return Task.REGRESSION
    if outputs.dim() == 2 and out_shape[1] == 1 and tgt_shape == out_shape[:1]:
        return Task.REGRESSION
    if outputs.dim() == 2 and tgt_shape == out_shape[:1] and bool((targets == targets.round()).all()):
        return Task.CLASSIFICATION  # class indices stored as floats (e.g. read from a CSV)
    raise ShapeMismatchError(f"model output {out_shape} does not fit float targets {tgt_shape}: give class "
                             f"indices {out_shape[:1]} as integers, or targets shaped like the output")


@dataclass(frozen=True)
class BatchScore:
    loss_sum: float
    loss_count: int
    correct: float | None
    scored: int


def score_batch(
    task: Task,
    outputs: torch.Tensor,
    targets: torch.Tensor | None,
    loss_fn: Callable | None = None,
) -> BatchScore:
    """Summed loss and correct count of one batch, so batches can be added exactly."""
    n = int(outputs.shape[0])
    out = outputs.float()
    if task is Task.LABEL_FREE:
        return BatchScore(0.0, 0, None, n)
    if task is Task.CUSTOM:
        loss = loss_fn(outputs, targets)
        value = float(loss.mean() if isinstance(loss, torch.Tensor) else loss)
        correct = None
        if outputs.dim() == 2 and not targets.is_floating_point() and targets.shape == outputs.shape[:1]:
            correct = float((out.argmax(dim=1) == targets).sum())
        return BatchScore(value * n, n, correct, n)
    if task is Task.CLASSIFICATION:
        one_hot = targets.is_floating_point() and targets.dim() == 2
        labels = targets.argmax(dim=1) if one_hot else targets.long()
        _check_class_range(labels, out.shape[1])
        loss = F.cross_entropy(out, labels, reduction="sum")
        return BatchScore(float(loss), n, float((out.argmax(dim=1) == labels).sum()), n)
    if task is Task.SEGMENTATION:
        labels = targets.long()
        _check_class_range(labels, out.shape[1])
        loss = F.cross_entropy(out, labels, reduction="sum")
        pixels = labels.numel()
        return BatchScore(float(loss), pixels, float((out.argmax(dim=1) == labels).sum()), pixels)
    if task is Task.BINARY:
        logits, labels = out.reshape(-1), targets.float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        return BatchScore(float(loss), n, float(((logits > 0).float() == labels).sum()), n)
    if task is Task.MULTILABEL:
        labels = targets.float()
        loss = F.binary_cross_entropy_with_logits(out, labels, reduction="sum")
        return BatchScore(float(loss), labels.numel(), float(((out > 0).float() == labels).sum()), labels.numel())
    # regression
    labels = targets.float().reshape(out.shape)
    loss = F.mse_loss(out, labels, reduction="sum")
    return BatchScore(float(loss), labels.numel(), None, labels.numel())


def _check_class_range(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ShapeMismatchError(
            f"targets hold class {int(labels.max())} but the model outputs {num_classes} classes; "
            "check --num-classes or the targets"
        )


class MetricAccumulator:
    """Adds :class:`BatchScore` values and turns them into :class:`Metrics`."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.loss_count = 0
        self.correct = 0.0
        self.scored = 0
        self.has_accuracy = True
        self.num_samples = 0

    def add(self, score: BatchScore, num_samples: int) -> None:
        self.loss_sum += score.loss_sum
        self.loss_count += score.loss_count
        self.num_samples += num_samples
        if score.correct is None:
            self.has_accuracy = False
        else:
            self.correct += score.correct
            self.scored += score.scored

    def result(self) -> Metrics:
        loss = self.loss_sum / self.loss_count if self.loss_count else None
        accuracy = self.correct / self.scored if self.has_accuracy and self.scored else None
        return Metrics(loss, accuracy, self.num_samples)


def prediction_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(number of samples whose predicted class matches, samples) for class-like outputs,
    else a per-element comparison of signs for single outputs."""
    if a.dim() >= 2 and a.shape[1] > 1:
        same = (a.argmax(dim=1) == b.argmax(dim=1)).float()
        same = same.reshape(same.shape[0], -1).mean(dim=1)
        return float(same.sum()), int(a.shape[0])
    same = (a > 0) == (b > 0)
    return float(same.reshape(a.shape[0], -1).float().mean(dim=1).sum()), int(a.shape[0])


def relative_divergence(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum over samples of ||a - b|| / ||b||, with b the train-mode output."""
    a2 = a.float().reshape(a.shape[0], -1)
    b2 = b.float().reshape(b.shape[0], -1)
    ratio = (a2 - b2).norm(dim=1) / b2.norm(dim=1).clamp_min(1e-12)
    return float(ratio.sum()), int(a.shape[0])


def majority_share(targets: torch.Tensor | None) -> float | None:
    """Share of a batch taken by its most common class (1.0 means single-class)."""
    if targets is None or targets.is_floating_point() or targets.dim() != 1 or targets.numel() < 2:
        return None
    counts = torch.bincount(targets.long().clamp_min(0))
    return float(counts.max()) / targets.numel()
