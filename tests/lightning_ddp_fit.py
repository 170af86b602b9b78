"""Fit LitConvNet with BNCheckCallback under DDP on CPU (gloo, 2 forked processes) and write what
each rank saw to OUT_DIR/rank<N>.json. Run as ``python tests/lightning_ddp_fit.py OUT_DIR``.
Forked ranks reuse this process's imports, so no rank pays for importing torch and Lightning again."""
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

from bncheck.integrations import BNCheckWarning
from bncheck.integrations.lightning import BNCheckCallback
from lightning_net import LitConvNet, loaders


class RankRecorder(pl.Callback):
    """In each rank: catch BNCheckWarnings during the fit, then write what the rank saw."""

    def __init__(self, check: BNCheckCallback, out_dir: Path):
        self.check, self.out_dir = check, out_dir

    def setup(self, trainer, pl_module, stage):
        self._catching = warnings.catch_warnings(record=True)
        self._caught = self._catching.__enter__()
        warnings.simplefilter("always", BNCheckWarning)

    def on_fit_end(self, trainer, pl_module):
        self._catching.__exit__(None, None, None)
        report = self.check.last_report
        seen = {
            "rank": trainer.global_rank,
            "epochs_completed": trainer.fit_loop.epoch_progress.current.completed,
            "warnings": [str(w.message) for w in self._caught if issubclass(w.category, BNCheckWarning)],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("bncheck/")},
            "gap": report.gate.value,
            "drift_max": max(layer.drift for layer in report.layers),
            "passed": report.passed,
            "world_size": report.data.world_size,
            "num_samples": report.data.num_samples,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


def main(out_dir: Path) -> None:
    check = BNCheckCallback(max_batches=4, on_fail="warn")
    fit = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork",
                     callbacks=[check, RankRecorder(check, out_dir)], logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    train, val = loaders(train=64, val=64, batch_size=16)
    fit.fit(LitConvNet(momentum=0.01), train, val)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
