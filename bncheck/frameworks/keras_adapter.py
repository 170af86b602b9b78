"""Keras 3 adapter (PyTorch backend only) for ``keras.layers.BatchNormalization``
and its subclasses, nested models included. Keras conventions differ from PyTorch's:

* ``momentum`` (default 0.99) weighs the OLD value: ``moving = m * moving + (1 - m) * batch``;
* ``moving_variance`` follows the BIASED batch variance; defaults: ``epsilon`` 1e-3, ``axis`` -1;
* a ``trainable=False`` layer runs in inference mode even when called with ``training=True``,
  so ``model.fit`` never uses batch statistics there;
* no ``num_batches_tracked`` counter, no train/eval flag: each call's ``training`` argument decides.
  In its place this adapter reports the model's optimizer steps (``model.optimizer.iterations`` after
  ``compile`` + ``fit``, or the count stored with the optimizer in a ``.keras``/``.weights.h5`` file) for
  trainable layers: each ``fit`` step updates a trainable BN layer once. It does not count training
  before that optimizer (pretraining, an earlier ``compile``), and is None when no optimizer took a step.

On the torch backend a Keras layer is a ``torch.nn.Module`` called via ``Module.__call__``: pre-hooks see
its input, and a ``with_kwargs`` pre-hook rewrites ``training`` for NORM_TRAIN (no attribute is patched).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendError, CheckpointError, InputError
from .base import ForwardMode, ModelAdapter, NormLayer


def import_keras():
    """Import Keras on the PyTorch backend, or raise :class:`BackendError`."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except Exception as exc:  # not installed, or a backend that fails to initialise
        if isinstance(exc, ModuleNotFoundError) and exc.name == "keras":
            raise BackendError('Keras is not installed: pip install "bncheck[keras]"') from None
        raise BackendError(f"Keras failed to import with KERAS_BACKEND={os.environ['KERAS_BACKEND']!r} "
                           f"(bncheck needs 'torch'): {type(exc).__name__}: {exc}") from None
    if (backend := keras.backend.backend()) != "torch":
        raise BackendError(f"Keras is running on the {backend!r} backend; bncheck needs the PyTorch backend: "
                           "set KERAS_BACKEND=torch before keras is imported")
    return keras


def is_keras_model(obj: Any) -> bool:
    """True for any Keras layer or model; never imports Keras itself."""
    layer_cls = getattr(getattr(sys.modules.get("keras"), "layers", None), "Layer", None)
    return layer_cls is not None and isinstance(obj, layer_cls)


class KerasNormLayer(NormLayer):
    """One ``keras.layers.BatchNormalization`` (Keras conventions, see the module docstring)."""

    framework = "keras"
    tracks_running_stats = True
    stores_unbiased_variance = False  # moving_variance follows the biased batch variance

    def __init__(self, name: str, module, optimizer_steps: int | None = None):
        self.name, self.module = name, module
        self.user_momentum = float(module.momentum)  # set_mode may overwrite module.momentum
        self.batch_stats_requested = False  # set by the adapter: the current mode asks for batch stats
        self.optimizer_steps = optimizer_steps  # the model optimizer's iterations, None when unknown

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def num_features(self) -> int | None:
        return None if self.module.moving_mean is None else int(self.module.moving_mean.shape[0])

    @property
    def momentum(self) -> float | None:  # as the user set it: the weight on the OLD value
        return self.user_momentum

    @property
    def update_weight(self) -> float | None:
        return 1.0 - self.user_momentum

    @property
    def eps(self) -> float:
        return float(self.module.epsilon)

    @property
    def channel_dim(self) -> int:
        """Keras ``axis`` as written (-1 for channels-last); Keras 2 configs may hold a one-item list."""
        axis = self.module.axis
        return int(axis[0] if isinstance(axis, (list, tuple)) else axis)

    @property
    def params_frozen(self) -> bool:
        """``trainable=False``: Keras then also keeps the layer in inference mode."""
        return not self.module.trainable

    @property
    def is_training(self) -> bool:
        return self.batch_stats_requested and bool(self.module.trainable)

    def running_mean(self) -> torch.Tensor | None:
        variable = self.module.moving_mean  # None until the layer is built
        return None if variable is None else variable.value.detach().to("cpu", torch.float64)

    def running_var(self) -> torch.Tensor | None:
        variable = self.module.moving_variance
        return None if variable is None else variable.value.detach().to("cpu", torch.float64)

    def num_batches_tracked(self) -> int | None:
        """Keras keeps no counter: the optimizer's steps since ``compile`` (one moving-average update
        each while the layer is trainable), None for a frozen layer (``fit`` does not update it) or
        when the model has no optimizer that took a step. Earlier training is not counted."""
        return self.optimizer_steps if self.module.trainable else None

    @property
    def batch_stats_in_train(self) -> bool:
        """``fit`` normalises a trainable layer with batch statistics; ``trainable=False`` means inference mode."""
        return bool(self.module.trainable)

    def add_stats_hook(self, recorder):
        def pre_hook(_module, args):
            if recorder.active and args and isinstance(args[0], torch.Tensor):  # skip symbolic calls
                recorder.record_input(args[0])
        return self.module.register_forward_pre_hook(pre_hook)

    def write_running_stats(self, mean, biased_var, unbiased_var, num_batches: int = 0) -> None:
        """Biased variance (``unbiased_var`` unused; Keras keeps no update counter); renorm also keeps
        ``moving_stddev = sqrt(var + eps)``."""
        pairs = [(self.module.moving_mean, mean), (self.module.moving_variance, biased_var)]
        if getattr(self.module, "renorm", False):
            pairs.append((self.module.moving_stddev, torch.sqrt(torch.as_tensor(biased_var) + self.eps)))
        for variable, value in pairs:
            variable.assign(torch.as_tensor(value).to(variable.value.device, variable.value.dtype))


def _force_training(_module, args, kwargs):
    return args, {**kwargs, "training": True}


def _guard_variables(module) -> list[Any]:
    """Hooks that put back every non-trainable variable of ``module`` after each call."""
    saved: list[tuple[Any, torch.Tensor]] = []

    def save(_module, _args):
        saved[:] = [(v, v.value.detach().clone()) for v in module.non_trainable_variables]

    return [module.register_forward_pre_hook(save), module.register_forward_hook(lambda *_: _copy_back(saved))]


def _copy_back(pairs) -> None:
    with torch.no_grad():
        for variable, value in pairs:
            variable.value.copy_(value)


@dataclass(frozen=True)
class _KerasSnapshot:
    values: tuple[tuple[Any, torch.Tensor], ...]  # (variable, value): moving stats, seed states
    flags: tuple[tuple[float, bool], ...]  # (momentum, trainable) of each norm layer


class KerasModelAdapter(ModelAdapter):
    """Drives a Keras model: ``training=`` per call, momentum 1.0 to freeze moving stats."""

    framework = "keras"

    def __init__(self, model):
        self._keras = keras = import_keras()
        if not isinstance(model, keras.layers.Layer):
            raise InputError(f"expected a Keras model or layer, got {type(model).__name__}")
        self.model = model
        self._layers = _named_layers(model)
        steps = _optimizer_steps(model)
        self._norm = [KerasNormLayer(name, layer, steps) for name, layer in self._layers
                      if isinstance(layer, keras.layers.BatchNormalization)]
        self._training_call = False
        self._hooks: list[Any] = []

    def norm_layers(self) -> list[NormLayer]:
        return list(self._norm)

    def has_dropout(self) -> bool:
        """Dropout, SpatialDropout*, GaussianDropout, AlphaDropout with rate > 0, or GaussianNoise."""
        kl = self._keras.layers
        return any((isinstance(layer, (kl.Dropout, kl.GaussianDropout, kl.AlphaDropout)) and layer.rate > 0)
                   or (isinstance(layer, kl.GaussianNoise) and layer.stddev > 0) for _, layer in self._layers)

    def snapshot(self) -> _KerasSnapshot:
        """Non-trainable variables (moving stats, seed states; no forward writes the others), flags."""
        return _KerasSnapshot(
            values=tuple((v, v.value.detach().clone()) for v in self.model.non_trainable_variables),
            flags=tuple((layer.module.momentum, layer.module.trainable) for layer in self._norm),
        )

    def restore(self, snapshot: _KerasSnapshot) -> None:
        self._remove_hooks()
        self._training_call = False
        for layer, (momentum, trainable) in zip(self._norm, snapshot.flags):
            layer.module.momentum, layer.batch_stats_requested = momentum, False
            if layer.module.trainable != trainable:
                layer.module.trainable = trainable  # the setter also walks sublayers and variables
        _copy_back(snapshot.values)

    def set_mode(self, mode: ForwardMode, *, batch_stats: frozenset[str] | None = None) -> None:
        """EVAL: ``training=False``. NORM_TRAIN: that, but ``training=True`` forced on each BN (which a
        ``trainable=False`` BN ignores, as in ``fit``), or on those named in ``batch_stats``. FULL_TRAIN:
        ``training=True``. Momentum 1.0 keeps moving stats exactly unchanged; renorm layers (moving
        stddev) are also guarded by hooks."""
        self._remove_hooks()
        self._training_call = mode is ForwardMode.FULL_TRAIN
        for layer in self._norm:
            module = layer.module
            layer.batch_stats_requested = mode is not ForwardMode.EVAL
            freeze = mode is not ForwardMode.EVAL
            module.momentum = 1.0 if freeze else layer.user_momentum
            if mode is ForwardMode.NORM_TRAIN and (batch_stats is None or layer.name in batch_stats):
                self._hooks.append(module.register_forward_pre_hook(_force_training, with_kwargs=True))
            if freeze and getattr(module, "renorm", False):
                self._hooks += _guard_variables(module)

    def _remove_hooks(self) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def forward(self, inputs: Any) -> Any:
        """One positional argument, also for several inputs (list or dict); Keras converts arrays."""
        return self.model(inputs, training=self._training_call)

    def move_to(self, device: torch.device, *, channels_last: bool = False) -> None:
        """No-op: Keras places variables at creation (CUDA when available) and cannot move them."""

    def device_used(self, requested: torch.device) -> torch.device:
        for variable in self.model.weights:
            return variable.value.device
        return requested

    def prepare_inputs(self, inputs: Any, device: torch.device, *, channels_last: bool = False) -> Any:
        """Torch tensors on the device of the model's variables, which Keras chose (not ``device``);
        float64 becomes float32, integer inputs keep their dtype."""
        first = next(iter(self.model.variables), None)
        where = torch.device("cpu") if first is None else first.value.device

        def convert(x):
            if not isinstance(x, (np.ndarray, torch.Tensor)):
                return x
            tensor = torch.as_tensor(x)
            return (tensor.float() if tensor.dtype == torch.float64 else tensor).to(where)

        return self._keras.tree.map_structure(convert, inputs)

    def output_to_tensor(self, output: Any) -> Any:
        """Torch tensors (the same structure for several outputs)."""
        return self._keras.tree.map_structure(
            lambda t: t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)), output)

    def clone_model(self) -> Any:
        """An independent copy with the same weights and moving statistics, bit for bit.

        ``keras.models.clone_model`` (Sequential, Functional and subclassed models with a ``get_config``)
        rebuilds the layers, trainable flags included; ``set_weights`` then copies every variable.
        The optimizer is not copied. Models that cannot be cloned that way raise :class:`InputError`."""
        keras = self._keras
        try:
            clone = keras.models.clone_model(self.model)
            clone.set_weights(self.model.get_weights())
        except Exception as exc:
            raise InputError(f"cannot copy the Keras model ({type(exc).__name__}: {exc}); "
                             "recalibrate it in place instead (inplace=True)") from exc
        return clone

    def save(self, path) -> None:
        """A whole-model ``.keras`` file (``model.save``), or only the weights for ``.weights.h5``.

        Like a ``.keras`` MODEL, which bncheck loads uncompiled, the file holds the model without its
        optimizer (an uncompiled copy is saved when the model can be cloned): a stored optimizer step
        count would otherwise describe statistics that recalibration replaced.
        ``path`` may already exist (an empty temporary file): it is overwritten."""
        name = str(path).lower()
        if not name.endswith((".weights.h5", ".keras")):
            suffix = Path(name).suffix or "a file without suffix"
            raise CheckpointError(f"cannot save a Keras model as {suffix}: use a .keras file (whole model) "
                                  "or .weights.h5 (weights only)")
        model = self.model
        if getattr(model, "optimizer", None) is not None:
            try:
                model = self.clone_model()
            except InputError:
                pass  # save it with its optimizer
        try:
            if name.endswith(".weights.h5"):
                model.save_weights(str(path), overwrite=True)
            else:
                model.save(str(path), overwrite=True)
        except Exception as exc:
            raise CheckpointError(f"cannot save the Keras model: {type(exc).__name__}: {exc}") from exc


def _optimizer_steps(model) -> int | None:
    """``model.optimizer.iterations`` when a compiled optimizer has taken a step (or the count that
    :func:`~bncheck.loading.keras_files.load_keras_model` read from the file), else None."""
    steps = None
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    if iterations is not None:
        try:
            steps = int(np.asarray(iterations.value.detach().cpu() if hasattr(iterations, "value") else iterations))
        except Exception:
            steps = None
    if not steps:  # no optimizer, or a fresh one (model.py compiled it, the weights came from a file)
        steps = getattr(model, "_bncheck_optimizer_steps", None)
    return steps if isinstance(steps, int) and steps > 0 else None


def _named_layers(model) -> list[tuple[str, Any]]:
    """Every layer once (shared layers too), named by its path of layer names."""
    found: list[tuple[str, Any]] = [(model.name, model)]
    seen = {id(model)}

    def visit(parent, prefix: str) -> None:
        for layer in parent._flatten_layers(include_self=False, recursive=False):
            if id(layer) not in seen:
                seen.add(id(layer))
                found.append((prefix + layer.name, layer))
                visit(layer, f"{prefix}{layer.name}/")

    visit(model, "")
    return found
