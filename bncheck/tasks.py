"""What the model predicts and how to score it: task detection, loss and accuracy.

Pure functions over output and target tensors. Scores are per sample and stay on the
device; summed over samples they do not depend on how the data is batched.
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
class SampleScores:
    """Per-unit scores of one batch, on the outputs' device (computing them never syncs the host).

    Losses are summed per unit: a unit is a sample, or the whole batch when a ``loss_fn``
    gives one number per batch. ``correct`` counts the correct elements of each sample
    (one per sample for classification, pixels for segmentation, labels for multi-label),
    out of ``scored`` elements per sample. ``out_of_range`` counts class targets outside the
    model's classes; they are clamped to score at all and reported afterwards.
    """

    loss: torch.Tensor | None        # (units,) float64 summed loss per unit
    loss_elements: int               # elements behind the loss of the whole batch
    correct: torch.Tensor | None     # (n,) float64 correct elements per sample
    scored: int                      # scored elements per sample
    out_of_range: torch.Tensor | None = None   # count of such targets
    largest_class: torch.Tensor | None = None  # the largest class target (for the message)


def score_samples(task: Task, outputs: torch.Tensor, targets: torch.Tensor | None,
                  loss_fn: Callable | None = None) -> SampleScores:
    """Loss and correctness of each sample of one batch, so batches and processes add up exactly."""
    n = int(outputs.shape[0])
    out = outputs.float()
    if task is Task.LABEL_FREE:
        return SampleScores(None, 0, None, 1)
    if task is Task.CUSTOM:
        loss = loss_fn(outputs, targets)
        value = (loss.mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)))
        correct = None
        if outputs.dim() == 2 and not targets.is_floating_point() and targets.shape == outputs.shape[:1]:
            correct = (out.argmax(dim=1) == targets).double()
        return SampleScores((value.double() * n).reshape(1).to(out.device), n, correct, 1)
    if task in (Task.CLASSIFICATION, Task.SEGMENTATION):
        one_hot = task is Task.CLASSIFICATION and targets.is_floating_point() and targets.dim() == 2
        labels = targets.argmax(dim=1) if one_hot else targets.long()
        classes = out.shape[1]
        bad, largest = ((labels < 0) | (labels >= classes)).sum(), labels.max()
        labels = labels.clamp(0, classes - 1)
        loss = F.cross_entropy(out, labels, reduction="none").double().reshape(n, -1).sum(1)
        correct = (out.argmax(dim=1) == labels).double().reshape(n, -1).sum(1)
        per_sample = labels[0].numel() if n else 1
        return SampleScores(loss, n * per_sample, correct, per_sample, bad, largest)
    if task is Task.BINARY:
        logits, labels = out.reshape(-1), targets.float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").double()
        return SampleScores(loss, n, ((logits > 0).float() == labels).double(), 1)
    if task is Task.MULTILABEL:
        labels = targets.float()
        loss = F.binary_cross_entropy_with_logits(out, labels, reduction="none").double().sum(1)
        correct = ((out > 0).float() == labels).double().sum(1)
        return SampleScores(loss, labels.numel(), correct, int(labels.shape[1]))
    # regression
    labels = targets.float().reshape(out.shape)
    loss = F.mse_loss(out, labels, reduction="none").double().reshape(n, -1).sum(1)
    return SampleScores(loss, labels.numel(), None, 1)


def prediction_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of predictions that match: the argmax class for class-like outputs
    (per position for dense maps), else the sign of each output."""
    if a.dim() >= 2 and a.shape[1] > 1:
        same = (a.argmax(dim=1) == b.argmax(dim=1)).double()
    else:
        same = ((a > 0) == (b > 0)).double()
    return same.reshape(same.shape[0], -1).mean(dim=1)


def relative_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample, ||a - b|| / ||b||, with b the train-mode output."""
    a2 = a.double().reshape(a.shape[0], -1)
    b2 = b.double().reshape(b.shape[0], -1)
    return (a2 - b2).norm(dim=1) / b2.norm(dim=1).clamp_min(1e-12)


def class_labels(task: Task, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Class indices of a batch's targets for the label-balance checks, None for other tasks."""
    if targets is None or task not in (Task.CLASSIFICATION, Task.BINARY, Task.CUSTOM):
        return None
    if task is Task.CLASSIFICATION and targets.is_floating_point() and targets.dim() == 2:
        return targets.argmax(dim=1)
    if targets.is_floating_point() and task is not Task.BINARY:
        return None
    labels = targets.reshape(-1).long() if task is Task.BINARY else targets
    return labels if labels.dim() == 1 and labels.numel() >= 2 else None


def majority_share(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of a batch taken by its most common class (1.0 means single-class), on the device
    (a scatter rather than bincount, whose output size would have to be read from the device)."""
    index = labels.long().clamp(0, num_classes - 1)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    return counts.max() / labels.numel()
