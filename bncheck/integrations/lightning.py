"""``BNCheckCallback`` for ``lightning.Trainer`` (``pip install "bncheck[lightning]"``).

At the end of each validation run (the sanity check excluded) in every ``every_n_epochs``-th epoch
it diagnoses the LightningModule, called as ``pl_module(x)``, on up to ``max_batches`` batches of the
trainer's first validation dataloader (or ``dataloader``), on the module's device. It logs
``bncheck/gap``, ``bncheck/drift_max`` and ``bncheck/passed`` and acts on a fail by ``on_fail``.

Under DDP every rank runs the diagnosis (inside a process group ``bncheck.diagnose`` works with its
collectives, so no rank may skip it); only rank zero warns.
"""
from __future__ import annotations

import warnings
from typing import Any

from ..errors import BackendError, BatchNormCheckFailed, InputError
from . import BNCheckWarning
from .epoch_check import EpochCheck, OnFail, diagnose_untouched, failure_message, logged_values

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] != "lightning":
        raise
    raise BackendError('Lightning is not installed: pip install "bncheck[lightning]"') from None

# How each logged value combines across ranks; the values agree on every rank, so this changes
# nothing there, and it keeps Lightning's epoch-level sync_dist advice quiet.
_REDUCE = {"gap": "max", "drift_max": "max", "passed": "min"}


class BNCheckCallback(pl.Callback):
    """Diagnose BatchNorm train/eval consistency at validation epoch end; see the module docstring.

    ``on_fail``: ``"warn"`` issues a :class:`~bncheck.integrations.BNCheckWarning` naming the finding
    codes and the top finding's fix; ``"stop"`` warns and sets ``trainer.should_stop``; ``"raise"`` raises
    :class:`~bncheck.errors.BatchNormCheckFailed` carrying the report. ``last_report`` holds the latest
    :class:`~bncheck.report.Report`. The model is never changed.
    """

    def __init__(self, max_batches: int | None = 8, max_gap: float | None = 0.05, every_n_epochs: int = 1,
                 dataloader: Any = None, on_fail: str = "warn"):
        super().__init__()
        self.check = EpochCheck.from_arguments(max_batches, max_gap, every_n_epochs, on_fail)
        self.dataloader = dataloader
        self.last_report = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_overridden("validation_step", pl_module):
            rank_zero_warn("BNCheckCallback runs at validation epoch end, but this LightningModule has no "
                           "validation_step, so it will never run: add a validation_step and val_dataloaders")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.check.due(trainer.current_epoch):
            return
        report = diagnose_untouched(pl_module, self._data(trainer), self.check, device=pl_module.device)
        self.last_report = report
        for key, value in logged_values(report).items():
            pl_module.log(f"bncheck/{key}", value, sync_dist=True, reduce_fx=_REDUCE[key])
        # One decision for all ranks, so that no rank stops or raises alone.
        if trainer.strategy.reduce_boolean_decision(not report.passed, all=False):
            self._act_on_fail(trainer, report)

    def _data(self, trainer: pl.Trainer) -> Any:
        if self.dataloader is not None:
            return self.dataloader
        loaders = trainer.val_dataloaders
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise InputError("BNCheckCallback found no validation dataloader: pass BNCheckCallback(dataloader=...)")
        return loaders

    def _act_on_fail(self, trainer: pl.Trainer, report) -> None:
        message = failure_message(report, trainer.current_epoch)
        if self.check.on_fail is OnFail.RAISE:
            raise BatchNormCheckFailed(message, report)
        if self.check.on_fail is OnFail.STOP:
            trainer.should_stop = True
            message += " Training stops (on_fail='stop')."
        if trainer.is_global_zero:
            warnings.warn(message, BNCheckWarning)


__all__ = ["BNCheckCallback"]
