"""BNCheckCallback in a real lightning.Trainer on CPU: fail, warn, stop, raise, pass silently,
log, leave the model and the training run untouched, and behave under DDP."""
import csv
import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402

from bncheck.errors import BatchNormCheckFailed, BncheckError, InputError  # noqa: E402
from bncheck.integrations import BNCheckWarning  # noqa: E402
from bncheck.integrations.lightning import BNCheckCallback  # noqa: E402
from conftest import readme_python_block  # noqa: E402
from lightning_net import LitConvNet, loaders, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
ROOT = Path(__file__).resolve().parents[1]
WELL_TRAINED_EPOCHS = 10  # 80 steps of a cosine schedule: weights settle, momentum-0.1 statistics follow


def fit(module, callbacks, max_epochs=1, **options):
    """Fit and return (trainer, the BNCheckWarnings it issued)."""
    run = trainer(max_epochs, callbacks, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BNCheckWarning)
        run.fit(module, *loaders())
    return run, [w for w in caught if issubclass(w.category, BNCheckWarning)]


def epochs_run(run) -> int:
    return run.fit_loop.epoch_progress.current.completed


def test_unconverged_statistics_warn_with_the_finding_and_stop():
    callback = BNCheckCallback(on_fail="stop")
    run, caught = fit(LitConvNet(momentum=0.01), [callback], max_epochs=3)
    assert epochs_run(run) == 1 and run.should_stop  # one short epoch (8 steps), then stopped
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "stats-not-converged" in message and "momentum=0.1" in message and "on_fail='stop'" in message
    report = callback.last_report
    assert not report.passed and report.findings[0].code == "stats-not-converged"
    assert report.gate.value > 0.2  # a clear fail, not a borderline one
    logged = {key: float(value) for key, value in run.callback_metrics.items()}
    assert logged["bncheck/passed"] == 0.0
    assert logged["bncheck/gap"] == pytest.approx(report.gate.value)
    assert logged["bncheck/drift_max"] == pytest.approx(max(layer.drift for layer in report.layers), rel=1e-6)


def test_a_well_trained_net_passes_silently():
    callback = BNCheckCallback(every_n_epochs=WELL_TRAINED_EPOCHS)  # earlier epochs have unconverged stats
    run, caught = fit(LitConvNet(momentum=0.1), [callback], max_epochs=WELL_TRAINED_EPOCHS)
    assert epochs_run(run) == WELL_TRAINED_EPOCHS and not run.should_stop
    assert caught == []
    report = callback.last_report
    # Far from the 0.05 threshold: eval and train-mode agree, and no layer drifts noticeably.
    assert report.passed and report.gate.value <= 0.02
    assert max(layer.drift for layer in report.layers) < 0.25
    assert float(run.callback_metrics["bncheck/passed"]) == 1.0


def test_raise_carries_the_report():
    with pytest.raises(BatchNormCheckFailed, match="stats-not-converged") as raised:
        fit(LitConvNet(momentum=0.01), [BNCheckCallback(on_fail="raise")], max_epochs=3)
    assert isinstance(raised.value, BncheckError)
    assert not raised.value.report.passed
    assert "stats-not-converged" in {finding.code for finding in raised.value.report.findings}


class StateProbe(pl.Callback):
    """Records the module's state_dict and every .training flag at validation epoch end."""

    def __init__(self):
        self.states, self.flags = [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            self.flags.append([m.training for m in pl_module.modules()])


def test_the_model_and_the_training_run_are_untouched():
    before, after = StateProbe(), StateProbe()
    run, caught = fit(LitConvNet(momentum=0.01), [before, BNCheckCallback(), after], max_epochs=2)
    assert epochs_run(run) == 2 and len(caught) == 2  # "warn" keeps training
    for state_before, state_after in zip(before.states, after.states, strict=True):
        assert state_before.keys() == state_after.keys()
        for key in state_before:  # buffers (num_batches_tracked too) and weights, bit for bit
            assert state_before[key].dtype == state_after[key].dtype
            assert torch.equal(state_before[key], state_after[key]), key
    assert before.flags == after.flags
    # Training goes on exactly as without the callback: not even the random stream moved.
    plain, _ = fit(LitConvNet(momentum=0.01), [], max_epochs=2)
    for (name, checked), (_, unchecked) in zip(run.lightning_module.state_dict().items(),
                                               plain.lightning_module.state_dict().items(), strict=True):
        torch.testing.assert_close(checked, unchecked, rtol=1e-5, atol=1e-6, msg=name)


def test_every_n_epochs_and_no_sanity_check_in_the_logged_rows(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(LitConvNet(momentum=0.01), [BNCheckCallback(every_n_epochs=2)], max_epochs=4, logger=logger,
        num_sanity_val_steps=2)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("bncheck/gap")]
    assert [int(row["epoch"]) for row in rows] == [1, 3]
    assert all(float(row["bncheck/passed"]) == 0.0 and float(row["bncheck/drift_max"]) > 0.5 for row in rows)


def test_a_given_dataloader_replaces_the_validation_data():
    train, _ = loaders()
    callback = BNCheckCallback(dataloader=train, max_batches=3)
    fit(LitConvNet(momentum=0.01), [callback])
    assert callback.last_report.data.num_batches == 3
    assert callback.last_report.data.num_samples == 3 * train.batch_size


def test_a_module_without_validation_step_is_told_the_callback_never_runs():
    class NoValidation(LitConvNet):
        validation_step = pl.LightningModule.validation_step

    callback = BNCheckCallback()
    with pytest.warns(UserWarning, match="no validation_step"):
        trainer(1, [callback]).fit(NoValidation(momentum=0.1), loaders()[0])
    assert callback.last_report is None


@pytest.mark.parametrize("arguments, complaint", [
    ({"on_fail": "ignore"}, "on_fail must be one of 'warn', 'stop', 'raise'"),
    ({"max_batches": 0}, "max_batches"),
    ({"max_batches": 2.5}, "max_batches"),
    ({"max_gap": -0.1}, "max_gap"),
    ({"max_gap": float("nan")}, "max_gap"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"every_n_epochs": True}, "every_n_epochs"),
])
def test_bad_arguments_are_refused_at_construction(arguments, complaint):
    with pytest.raises(InputError, match=complaint):
        BNCheckCallback(**arguments)


def test_the_readme_example_stops_with_the_finding(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BNCheckWarning)
        exec(compile(readme_python_block("from bncheck.integrations.lightning import"), "README.md", "exec"), {"__name__": "readme"})
    messages = [str(w.message) for w in caught if issubclass(w.category, BNCheckWarning)]
    assert len(messages) == 1 and "stats-not-converged" in messages[0]
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.startswith("1 {") and "'bncheck/passed': 0.0" in last_line  # stopped after epoch 0


def test_importing_bncheck_loads_no_training_framework():
    code = ("import sys, bncheck, bncheck.integrations; loaded = {m.split('.')[0] for m in sys.modules}; "
            "print(sorted(loaded & {'lightning', 'pytorch_lightning', 'keras', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


# --- DDP: two CPU processes (gloo) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """What each rank of a 2-process DDP fit saw (one run shared by the DDP tests)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the DDP script forks its ranks (strategy='ddp_fork')")
    out = tmp_path_factory.mktemp("ddp")
    # One thread per rank, as torchrun sets it: the ranks are forked, and OpenMP threads started
    # before a fork hang the child.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "BNCHECK_TEST_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp_fit.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_ddp_training_finishes_and_only_rank_zero_warns(ddp_ranks):
    zero, one = ddp_ranks
    assert zero["epochs_completed"] == one["epochs_completed"] == 1
    assert not zero["passed"] and not one["passed"]
    assert len(zero["warnings"]) == 1 and "stats-not-converged" in zero["warnings"][0]
    assert one["warnings"] == []
    assert zero["logged"] == one["logged"] and zero["logged"]["bncheck/passed"] == 0.0


def test_ddp_ranks_diagnose_the_whole_validation_set_identically(ddp_ranks):
    zero, one = ddp_ranks
    assert zero["world_size"] == one["world_size"] == 2
    assert zero["num_samples"] == one["num_samples"] == 64  # every validation sample once
    assert (zero["gap"], zero["drift_max"]) == (one["gap"], one["drift_max"])
    for rank in (zero, one):  # the logged values are the report's, not a reduction of different ones
        assert rank["logged"]["bncheck/gap"] == pytest.approx(rank["gap"])
        assert rank["logged"]["bncheck/drift_max"] == pytest.approx(rank["drift_max"], rel=1e-6)
