"""``BNCheckCallback`` for Keras 3 ``Model.fit`` on the PyTorch backend (``pip install "bncheck[keras]"``).

At the end of every ``every_n_epochs``-th epoch it diagnoses the model on up to ``max_batches``
batches of ``validation_data`` and adds ``bncheck_gap``, ``bncheck_drift_max`` and
``bncheck_passed`` to ``logs``, so they appear in ``History`` (and in callbacks listed after it).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..errors import BatchNormCheckFailed, InputError
from ..frameworks.keras_adapter import import_keras
from . import BNCheckWarning
from .epoch_check import EpochCheck, OnFail, diagnose_untouched, failure_message, logged_values

keras = import_keras()


class BNCheckCallback(keras.callbacks.Callback):
    """Diagnose BatchNorm train/eval consistency after each epoch of ``fit``.

    ``validation_data``: an ``(x, y)`` pair of arrays or tensors, an array of inputs alone
    (label-free), or anything :func:`bncheck.diagnose` accepts. ``batch_size``: the batch size of the
    train-mode pass for arrays (default 32, as ``fit``'s). ``on_fail``: ``"warn"`` issues a
    :class:`~bncheck.integrations.BNCheckWarning` naming the finding codes and the top finding's fix;
    ``"stop"`` warns and sets ``model.stop_training``; ``"raise"`` raises
    :class:`~bncheck.errors.BatchNormCheckFailed` carrying the report. ``last_report`` holds the
    latest :class:`~bncheck.report.Report`. The model is never changed.
    """

    def __init__(self, validation_data: Any, max_batches: int | None = 8, max_gap: float | None = 0.05,
                 every_n_epochs: int = 1, on_fail: str = "warn", batch_size: int | None = None):
        super().__init__()
        self.check = EpochCheck.from_arguments(max_batches, max_gap, every_n_epochs, on_fail)
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 2):
            raise InputError(f"batch_size must be a whole number >= 2 (train-mode BatchNorm needs 2+ samples "
                             f"per batch), got {batch_size!r}")
        if validation_data is None:
            raise InputError("BNCheckCallback needs validation_data: an (x, y) pair of arrays, or batches")
        self.validation_data = _as_tensors(validation_data)
        self.batch_size = batch_size
        self.last_report = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.check.due(epoch):
            return
        report = diagnose_untouched(self.model, self.validation_data, self.check, device=_model_device(self.model),
                                    batch_size=self.batch_size)
        self.last_report = report
        if logs is not None:
            logs.update({f"bncheck_{key}": value for key, value in logged_values(report).items()})
        if report.passed:
            return
        message = failure_message(report, epoch + 1)  # Keras prints epochs from 1
        if self.check.on_fail is OnFail.RAISE:
            raise BatchNormCheckFailed(message, report)
        if self.check.on_fail is OnFail.STOP:
            self.model.stop_training = True
            message += " Training stops (on_fail='stop')."
        warnings.warn(message, BNCheckWarning)


def _as_tensors(data: Any) -> Any:
    """numpy arrays become tensors, which bncheck.diagnose takes as a dataset (and batches itself)."""
    arrays = (np.ndarray, torch.Tensor)
    if isinstance(data, np.ndarray):
        return torch.as_tensor(data)
    if isinstance(data, (tuple, list)) and len(data) == 3 and all(isinstance(a, arrays) for a in data):
        raise InputError("validation_data looks like (x, y, sample_weight); pass (x, y): bncheck weighs every "
                         "sample equally")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(a, arrays) for a in data):
        return tuple(torch.as_tensor(a) for a in data)
    return data


def _model_device(model) -> torch.device:
    """Where Keras placed the variables (it cannot move them)."""
    for variable in model.weights:
        return variable.value.device
    return torch.device("cpu")


__all__ = ["BNCheckCallback"]
