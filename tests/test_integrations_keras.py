"""BNCheckCallback in Keras 3 ``Model.fit`` (PyTorch backend): fail, warn, stop, raise, pass silently,
History keys, and a model and training run left untouched."""
import os
import warnings

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bncheck.errors import BatchNormCheckFailed, InputError  # noqa: E402
from bncheck.integrations import BNCheckWarning  # noqa: E402
from bncheck.integrations.keras import BNCheckCallback  # noqa: E402
from conftest import image_data, readme_python_block  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras vs numpy 2
WELL_TRAINED_EPOCHS = 10   # 80 steps of batch 32 on a cosine schedule
SCHEDULE_STEPS = 80


def arrays(n: int, sample_seed: int | None = None):
    """The conftest image task, channels-last as Keras expects, shifted so that the first layer's
    statistics sit clearly away from the moving averages' 0/1 start."""
    x, y = image_data(n=n, seed=0, sample_seed=sample_seed)
    return (x + 2.0).permute(0, 2, 3, 1).numpy(), y.numpy()


TRAIN, VALIDATION = arrays(256), arrays(128, sample_seed=1)


def conv_net(momentum: float, seed: int = 0):
    """Two Conv2D + BatchNormalization blocks (Keras momentum: the weight on the OLD value)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    z = inputs
    for _ in range(2):
        z = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=momentum)(
            keras.layers.Conv2D(8, 3, padding="same")(z)))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(z)))
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-2, SCHEDULE_STEPS)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, callbacks, epochs=1, batch_size=32):
    """Fit and return (History, the BNCheckWarnings issued)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BNCheckWarning)
        history = model.fit(*TRAIN, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=callbacks)
    return history, [w for w in caught if issubclass(w.category, BNCheckWarning)]


def test_keras_default_momentum_fails_after_one_short_epoch_warns_and_stops():
    callback = BNCheckCallback(VALIDATION, on_fail="stop")
    model = conv_net(momentum=0.99)  # 16 steps: the moving averages are still 85% their 0/1 start
    history, caught = fit(model, [callback], epochs=3, batch_size=16)
    assert history.epoch == [0] and model.stop_training
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "stats-not-converged" in message and "momentum=0.9" in message and "on_fail='stop'" in message
    report = callback.last_report
    assert not report.passed and report.findings[0].code == "stats-not-converged" and report.gate.value > 0.2
    assert history.history["bncheck_passed"] == [0.0]
    assert history.history["bncheck_gap"] == [report.gate.value]
    assert history.history["bncheck_drift_max"] == [max(layer.drift for layer in report.layers)]


def test_a_well_trained_net_passes_silently():
    callback = BNCheckCallback(VALIDATION, every_n_epochs=WELL_TRAINED_EPOCHS)
    history, caught = fit(conv_net(momentum=0.9), [callback], epochs=WELL_TRAINED_EPOCHS)
    assert len(history.epoch) == WELL_TRAINED_EPOCHS and caught == []
    assert history.history["bncheck_passed"] == [1.0]  # checked once, at the last epoch
    report = callback.last_report
    assert report.passed and report.gate.value <= 0.02  # far from the 0.05 threshold
    assert max(layer.drift for layer in report.layers) < 0.25


def test_raise_carries_the_report():
    x, y = VALIDATION
    with pytest.raises(BatchNormCheckFailed, match="stats-not-converged") as raised:
        fit(conv_net(momentum=0.99), [BNCheckCallback((torch.as_tensor(x), torch.as_tensor(y)), on_fail="raise")],
            epochs=3, batch_size=16)
    assert "stats-not-converged" in {finding.code for finding in raised.value.report.findings}


class VariableProbe(keras.callbacks.Callback):
    """Every variable of the model at each epoch end (moving statistics and seed states included)."""

    def __init__(self):
        super().__init__()
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append([v.value.detach().clone() for v in self.model.variables])


def test_the_model_and_the_training_run_are_untouched():
    before, after = VariableProbe(), VariableProbe()
    model = conv_net(momentum=0.99)
    history, caught = fit(model, [before, BNCheckCallback(VALIDATION), after], epochs=2)
    assert len(history.epoch) == 2 and len(caught) == 2  # "warn" keeps training
    for values_before, values_after in zip(before.values, after.values, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(values_before, values_after, strict=True))
    plain = conv_net(momentum=0.99)
    fit(plain, [], epochs=2)
    for checked, unchecked in zip(model.variables, plain.variables, strict=True):
        torch.testing.assert_close(checked.value, unchecked.value, rtol=1e-5, atol=1e-6, msg=checked.path)


@pytest.mark.parametrize("arguments, complaint", [
    ({"on_fail": "stopp"}, "on_fail must be one of"),
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"batch_size": 1}, "batch_size"),
    ({"validation_data": None}, "needs validation_data"),
    ({"validation_data": (*VALIDATION, np.ones(128))}, "sample_weight"),
])
def test_bad_arguments_are_refused_at_construction(arguments, complaint):
    with pytest.raises(InputError, match=complaint):
        BNCheckCallback(**{"validation_data": VALIDATION, **arguments})


def test_the_readme_example_stops_with_the_finding(capsys):
    namespace = {"__name__": "readme"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BNCheckWarning)
        exec(compile(readme_python_block("from bncheck.integrations.keras import"), "README.md", "exec"), namespace)
    messages = [str(w.message) for w in caught if issubclass(w.category, BNCheckWarning)]
    assert len(messages) == 1 and "stats-not-converged" in messages[0]
    history = namespace["history"].history
    assert history["bncheck_passed"] == [0.0] and len(history["loss"]) == 1  # stopped after epoch 1
