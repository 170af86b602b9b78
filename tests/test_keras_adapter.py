"""Keras 3 (PyTorch backend) adapter: modes, hooks, state restore, recalibration, files."""
import os
import subprocess
import sys

import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bncheck.errors import BackendError, CheckpointError  # noqa: E402
from bncheck.frameworks import ForwardMode, adapter_for  # noqa: E402
from bncheck.frameworks.keras_adapter import KerasModelAdapter, import_keras, is_keras_model  # noqa: E402
from bncheck.files import write_atomically  # noqa: E402
from bncheck.loading.keras_files import load_keras_model, load_keras_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras vs numpy 2
CPU = torch.device("cpu")
EPS = 1e-3


def _randomise_bn(bn, rng):
    """Moving stats far from any batch's, so EVAL and NORM_TRAIN clearly differ."""
    n = bn.moving_mean.shape[0]
    bn.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    bn.beta.assign(rng.normal(size=n).astype("float32"))
    bn.moving_mean.assign(rng.normal(size=n).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 3.0, n).astype("float32"))


def conv_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    z = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    y = keras.layers.BatchNormalization(name="bn")(z)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(y))
    model = keras.Model(inp, out)
    _randomise_bn(model.get_layer("bn"), np.random.default_rng(1))
    return model, keras.Model(inp, z)  # the model and its BN-input sub-model


def axis1_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    z = keras.layers.Reshape((5, 4))(keras.layers.Dense(20, name="fc")(inp))
    y = keras.layers.BatchNormalization(axis=1, name="bn")(z)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(y))
    model = keras.Model(inp, out)
    _randomise_bn(model.get_layer("bn"), np.random.default_rng(2))
    return model, keras.Model(inp, z)


def dropout_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    y = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(8, name="fc")(inp))
    out = keras.layers.Dense(2, name="head")(keras.layers.Dropout(0.5, name="drop")(y))
    model = keras.Model(inp, out)
    _randomise_bn(model.get_layer("bn"), np.random.default_rng(3))
    return model


def batch(*shape, seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, size=shape)  # float64 on purpose


def run(adapter, mode, x, *, update_stats=False):
    adapter.set_mode(mode)
    if update_stats:  # undo the adapter's momentum freeze, to see what Keras itself would do
        for layer in adapter.norm_layers():
            layer.module.momentum = layer.user_momentum
    with adapter.no_grad():
        return adapter.output_to_tensor(adapter.forward(adapter.prepare_inputs(x, CPU)))


def value(variable):
    """A copy of a Keras variable (``variable.numpy()`` warns under numpy 2)."""
    return variable.value.detach().cpu().numpy().copy()


def state(model):
    return {v.path: value(v) for v in model.variables}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].tobytes() == after[key].tobytes(), key


def test_layer_properties_follow_keras_conventions():
    model, _ = conv_model()
    adapter = adapter_for(model)
    assert isinstance(adapter, KerasModelAdapter)
    (layer,) = adapter.norm_layers()
    assert (layer.name, layer.framework, layer.type_name) == ("bn", "keras", "BatchNormalization")
    assert (layer.momentum, layer.eps, layer.channel_dim, layer.num_features) == (0.99, EPS, -1, 4)
    assert layer.update_weight == pytest.approx(0.01)
    assert not layer.stores_unbiased_variance and layer.tracks_running_stats and layer.num_batches_tracked() is None
    assert layer.running_mean().dtype == torch.float64
    np.testing.assert_array_equal(layer.running_var().numpy(), value(model.get_layer("bn").moving_variance))
    assert not adapter.has_dropout() and adapter_for(dropout_model()).has_dropout()


def test_nested_models_are_searched_and_named_by_path():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(name="ibn")(inner_in), name="inner")
    inp = keras.Input((4,))
    model = keras.Model(inp, inner(keras.layers.BatchNormalization(name="obn")(inp)))
    assert [layer.name for layer in adapter_for(model).norm_layers()] == ["obn", "inner/ibn"]


def test_norm_train_uses_biased_batch_stats_and_keeps_moving_stats():
    model, features = conv_model()
    adapter = adapter_for(model)
    before = state(model)
    x = batch(6, 8, 8, 3)
    out_train = run(adapter, ForwardMode.NORM_TRAIN, x)
    out_eval = run(adapter, ForwardMode.EVAL, x)
    assert_same_state(before, state(model))

    bn, head = model.get_layer("bn"), model.get_layer("head")
    z = features(torch.as_tensor(x, dtype=torch.float32), training=False).double()
    gamma, beta = (torch.as_tensor(value(v), dtype=torch.float64) for v in (bn.gamma, bn.beta))
    kernel, bias = (torch.as_tensor(value(v), dtype=torch.float64) for v in (head.kernel, head.bias))

    def manual(mean, var):
        y = (z - mean) / torch.sqrt(var + EPS) * gamma + beta
        return y.mean(dim=(1, 2)) @ kernel + bias

    dims = (0, 1, 2)
    expected_train = manual(z.mean(dim=dims), z.var(dim=dims, unbiased=False))
    moving = (torch.as_tensor(value(v), dtype=torch.float64) for v in (bn.moving_mean, bn.moving_variance))
    expected_eval = manual(*moving)
    torch.testing.assert_close(out_train.double(), expected_train, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_eval.double(), expected_eval, atol=1e-4, rtol=1e-4)
    assert (out_train - out_eval).abs().max() > 0.1


def test_unfrozen_norm_train_updates_with_keras_momentum_and_biased_variance():
    model, features = axis1_model()
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    old_mean, old_var = layer.running_mean(), layer.running_var()
    x = batch(7, 6)
    run(adapter, ForwardMode.NORM_TRAIN, x, update_stats=True)
    z = features(torch.as_tensor(x, dtype=torch.float32)).double()
    mean, var = z.mean(dim=(0, 2)), z.var(dim=(0, 2), unbiased=False)
    torch.testing.assert_close(layer.running_mean(), 0.99 * old_mean + 0.01 * mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.running_var(), 0.99 * old_var + 0.01 * var, atol=1e-6, rtol=1e-5)


class InputsSeen:
    """A stats recorder that keeps what the hook hands it (Keras layers always pass their input)."""

    active = True

    def __init__(self):
        self.inputs = []

    def record_input(self, x):
        self.inputs.append(x)

    def record_batch_stats(self, *_):
        raise AssertionError("Keras layers report their input, not kernel statistics")


@pytest.mark.parametrize("make, channel_dim, channels", [(conv_model, -1, 4), (axis1_model, 1, 5)])
def test_input_hook_sees_bn_input_on_its_channel_axis(make, channel_dim, channels):
    model, features = make()
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    recorder = InputsSeen()
    handle = layer.add_stats_hook(recorder)
    seen = recorder.inputs
    x = batch(3, *model.input_shape[1:])
    run(adapter, ForwardMode.NORM_TRAIN, x)
    handle.remove()
    run(adapter, ForwardMode.EVAL, x)
    assert len(seen) == 1 and layer.channel_dim == channel_dim
    assert seen[0].shape[channel_dim] == channels == layer.num_features
    torch.testing.assert_close(seen[0], features(torch.as_tensor(x, dtype=torch.float32)))


def test_restore_after_full_train_and_a_failure_mid_forward():
    model = dropout_model()
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    bn = layer.module
    x = batch(5, 6)
    eval_before = run(adapter, ForwardMode.EVAL, x)
    before = state(model)
    snap = adapter.snapshot()
    run(adapter, ForwardMode.FULL_TRAIN, x, update_stats=True)
    assert not np.array_equal(value(bn.moving_mean), before[bn.moving_mean.path])  # stats did move

    def boom(_module, _args):
        raise RuntimeError("boom")

    head_hook = model.get_layer("head").register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            run(adapter, ForwardMode.NORM_TRAIN, x, update_stats=True)  # BN updates, then head fails
        finally:
            head_hook.remove()
            bn.trainable = False
            adapter.restore(snap)
    assert_same_state(before, state(model))
    assert (bn.momentum, bn.trainable, len(bn._forward_pre_hooks), layer.is_training) == (0.99, True, 0, False)
    assert torch.equal(run(adapter, ForwardMode.EVAL, x), eval_before)


def test_restore_after_wrong_shaped_input():
    model, _ = conv_model()
    adapter = adapter_for(model)
    before = state(model)
    snap = adapter.snapshot()
    with pytest.raises(ValueError):
        try:
            run(adapter, ForwardMode.NORM_TRAIN, batch(2, 8, 8, 5))
        finally:
            adapter.restore(snap)
    assert_same_state(before, state(model))
    assert model.get_layer("bn").momentum == 0.99 and not model.get_layer("bn")._forward_pre_hooks


@pytest.mark.parametrize("make, shape, dims", [(conv_model, (6, 8, 8, 3), (0, 1, 2)), (axis1_model, (6, 6), (0, 2))])
def test_recalibrated_eval_matches_norm_train_on_the_same_batch(make, shape, dims):
    model, _ = make()
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    recorder = InputsSeen()
    handle = layer.add_stats_hook(recorder)
    seen = recorder.inputs
    x = batch(*shape, seed=5)
    out_train = run(adapter, ForwardMode.NORM_TRAIN, x)
    handle.remove()
    z = seen[0].double()
    mean, biased, unbiased = z.mean(dim=dims), z.var(dim=dims, unbiased=False), z.var(dim=dims, unbiased=True)
    layer.write_running_stats(mean, biased, unbiased)
    torch.testing.assert_close(layer.running_var(), biased, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(adapter, ForwardMode.EVAL, x), out_train, atol=1e-5, rtol=1e-5)


def test_non_trainable_bn_is_frozen_and_stays_in_inference():
    model, _ = conv_model()
    model.get_layer("bn").trainable = False
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    assert layer.params_frozen
    x = batch(4, 8, 8, 3)
    out_eval = run(adapter, ForwardMode.EVAL, x)
    out_train = run(adapter, ForwardMode.NORM_TRAIN, x)
    assert not layer.is_training
    assert torch.equal(out_train, out_eval)


def test_is_keras_model_and_lazy_import():
    model, _ = conv_model()
    assert is_keras_model(model) and not is_keras_model(torch.nn.Linear(2, 2)) and not is_keras_model(None)
    code = ("import sys; from bncheck.frameworks.keras_adapter import is_keras_model; "
            "import torch; print(is_keras_model(torch.nn.Linear(2, 2)), 'keras' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.split() == ["False", "False"]


def test_save_round_trips_atomically(tmp_path):
    model, _ = conv_model()
    path = tmp_path / "model.keras"
    write_atomically(path, adapter_for(model).save)
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]
    loaded = load_keras_model(path)
    assert_same_state(state(model), state(loaded))
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a .keras archive"):
        load_keras_model(tmp_path / "bad.keras")
    with pytest.raises(CheckpointError, match="not found"):
        load_keras_model(tmp_path / "missing.keras")


def test_full_train_turns_dropout_on_and_keeps_moving_stats():
    model = dropout_model()
    adapter = adapter_for(model)
    (layer,) = adapter.norm_layers()
    before = state(model)
    x = batch(64, 6)
    norm_train = run(adapter, ForwardMode.NORM_TRAIN, x)
    full_a, full_b = run(adapter, ForwardMode.FULL_TRAIN, x), run(adapter, ForwardMode.FULL_TRAIN, x)
    assert layer.is_training and layer.module.momentum == 1.0 and layer.momentum == 0.99
    assert not torch.equal(full_a, full_b) and not torch.equal(full_a, norm_train)  # dropout is active
    assert_same_state(before, state(model))
    run(adapter, ForwardMode.EVAL, x)
    assert not layer.is_training and layer.module.momentum == 0.99


def test_renorm_layer_moving_stats_stay_exact():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.BatchNormalization(renorm=True, name="bn")(inp))
    _randomise_bn(model.get_layer("bn"), np.random.default_rng(4))
    adapter = adapter_for(model)
    before = state(model)
    for mode in (ForwardMode.NORM_TRAIN, ForwardMode.FULL_TRAIN):
        run(adapter, mode, batch(16, 4))
    assert_same_state(before, state(model))


def test_renorm_recalibration_keeps_stddev_consistent():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.BatchNormalization(renorm=True, name="bn")(inp))
    (layer,) = adapter_for(model).norm_layers()
    var = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    layer.write_running_stats(torch.zeros(4, dtype=torch.float64), var, var * 2)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(value(bn.moving_variance), var.numpy(), rtol=1e-6)
    np.testing.assert_allclose(value(bn.moving_stddev) ** 2 - EPS, var.numpy(), rtol=1e-5)


def test_prepare_inputs_makes_float32_tensors_and_keeps_structure():
    adapter = adapter_for(dropout_model())
    inputs = {"a": batch(2, 3), "b": [np.arange(3), torch.ones(2, dtype=torch.float64)]}
    prepared = adapter.prepare_inputs(inputs, CPU)
    assert prepared["a"].dtype == torch.float32 and prepared["b"][0].dtype == torch.int64
    assert prepared["b"][1].dtype == torch.float32 and isinstance(prepared["b"], list)
    out = adapter.output_to_tensor([np.ones(2), torch.zeros(1)])
    assert isinstance(out[0], torch.Tensor) and torch.equal(out[0], torch.ones(2, dtype=torch.float64))


def test_import_keras_errors(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(BackendError, match="KERAS_BACKEND=torch"):
        import_keras()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "keras", None)  # what a missing package looks like to `import`
    with pytest.raises(BackendError, match=r'pip install "bncheck\[keras\]"'):
        import_keras()


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # Keras, on the mismatch
def test_weights_file_round_trip_and_mismatch(tmp_path):
    model, _ = conv_model()
    path = tmp_path / "w.weights.h5"
    write_atomically(path, adapter_for(model).save)
    fresh, _ = conv_model()
    fresh.get_layer("bn").moving_mean.assign(np.zeros(4, dtype="float32"))
    load_keras_weights(fresh, path)
    assert_same_state(state(model), state(fresh))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_keras_weights(dropout_model(), path)
    with pytest.raises(CheckpointError, match="use a .keras file"):
        write_atomically(tmp_path / "model.h5", adapter_for(model).save)
    assert not (tmp_path / "model.h5").exists()


def test_clone_model_copies_moving_stats_exactly_and_independently():
    model, _ = conv_model()
    model.get_layer("bn").trainable = False
    adapter = adapter_for(model)
    before = state(model)
    clone = adapter.clone_model()
    assert clone is not model and clone.get_layer("bn") is not model.get_layer("bn")
    assert [value(v).tobytes() for v in clone.weights] == [before[v.path].tobytes() for v in model.weights]
    assert not clone.get_layer("bn").trainable and adapter_for(clone).norm_layers()[0].params_frozen
    clone.get_layer("bn").moving_mean.assign(np.zeros(4, dtype="float32"))
    assert_same_state(before, state(model))
    x = batch(3, 8, 8, 3)
    model.get_layer("bn").moving_mean.assign(before["bn/moving_mean"])
    torch.testing.assert_close(run(adapter_for(adapter.clone_model()), ForwardMode.EVAL, x),
                               run(adapter, ForwardMode.EVAL, x), atol=0, rtol=0)


def test_library_recalibrate_leaves_the_keras_model_alone():
    import bncheck

    model, _ = conv_model()
    before = state(model)
    data = (torch.as_tensor(batch(12, 8, 8, 3), dtype=torch.float32), torch.arange(12) % 2)
    result, fixed = bncheck.recalibrate(model, data, return_model=True)
    assert result.layers_updated == 1 and fixed is not model
    assert_same_state(before, state(model))
    assert not np.array_equal(value(fixed.get_layer("bn").moving_mean), before["bn/moving_mean"])


def test_adapter_save_writes_keras_files_and_refuses_other_suffixes(tmp_path):
    model, _ = conv_model()
    adapter = adapter_for(model)
    whole = tmp_path / "m.keras"
    whole.write_bytes(b"")  # recalibration hands over an existing (empty) temporary file
    adapter.save(whole)
    assert_same_state(state(model), state(load_keras_model(whole)))
    adapter.save(tmp_path / "m.weights.h5")
    fresh, _ = conv_model()
    fresh.get_layer("bn").moving_variance.assign(np.ones(4, dtype="float32"))
    load_keras_weights(fresh, tmp_path / "m.weights.h5")
    assert_same_state(state(model), state(fresh))
    with pytest.raises(CheckpointError, match=r"as \.pt: use a \.keras file"):
        adapter.save(tmp_path / ".fixed.x1y2.pt")


def test_num_batches_tracked_is_the_optimizer_step_count_for_trainable_layers():
    model, _ = conv_model()
    (layer,) = adapter_for(model).norm_layers()
    assert layer.num_batches_tracked() is None  # not compiled
    model.compile(optimizer="sgd", loss="mse")
    assert adapter_for(model).norm_layers()[0].num_batches_tracked() is None  # compiled, no step yet
    model.fit(batch(8, 8, 8, 3).astype("float32"), np.zeros((8, 2), "float32"), batch_size=4, epochs=2, verbose=0)
    assert adapter_for(model).norm_layers()[0].num_batches_tracked() == 4
    model.get_layer("bn").trainable = False  # fit() no longer updates it: the count does not apply
    assert adapter_for(model).norm_layers()[0].num_batches_tracked() is None


def test_saved_files_hold_no_optimizer_step_count(tmp_path):
    """Recalibrated statistics must not be described by the optimizer's old step count."""
    model, _ = conv_model()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(batch(8, 8, 8, 3).astype("float32"), np.zeros((8, 2), "float32"), batch_size=4, verbose=0)
    model.save(tmp_path / "trained.keras")
    assert adapter_for(load_keras_model(tmp_path / "trained.keras")).norm_layers()[0].num_batches_tracked() == 2
    adapter = adapter_for(model)
    adapter.save(tmp_path / "fixed.keras")
    loaded = load_keras_model(tmp_path / "fixed.keras")
    assert adapter_for(loaded).norm_layers()[0].num_batches_tracked() is None
    assert_same_state(state(model), state(loaded))


def test_report_names_the_device_keras_runs_on():
    import bncheck

    model, _ = conv_model()
    x = torch.as_tensor(batch(8, 8, 8, 3), dtype=torch.float32)
    y = torch.randint(0, 2, (8,))
    report = bncheck.diagnose(model, (x, y), device="cpu")
    assert report.device == str(next(iter(model.weights)).value.device) == "cpu"
