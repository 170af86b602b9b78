"""PyTorch adapter: the model's modes, forward and state; its norm layers live in torch_layers.

The training mode is the user's own ``model.train()``: it is called once, when the adapter is
built, so an overridden ``train()`` that keeps some norm layers in eval (mmdetection's
``norm_eval``, fastai's ``BnFreeze``, Lightning's ``BaseFinetuning``) decides which layers use
batch statistics. NORM_TRAIN is that mode with dropout and stochastic depth back in eval.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .base import ForwardMode, ModelAdapter, NormLayer
from .functional_dropout import FunctionalDropoutGuard
from .torch_layers import TorchLayer, make_layer

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Stochastic depth and friends outside torch.nn: torchvision's StochasticDepth, timm's DropPath/DropBlock.
_DROPOUT_NAME_PARTS = ("Dropout", "DropPath", "StochasticDepth", "DropBlock")


def is_dropout_like(module: nn.Module) -> bool:
    """torch.nn's dropouts, and leaf modules named like one (a block named "...DropPath" that holds
    layers is no dropout: turning its flag off would change more than its dropout)."""
    if isinstance(module, _DROPOUT_TYPES):
        return True
    return not any(True for _ in module.children()) and any(p in type(module).__name__ for p in _DROPOUT_NAME_PARTS)


def _drop_rate(module: nn.Module) -> float:
    for attribute in ("p", "drop_prob", "rate"):
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1.0  # unknown: assume it drops


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module that holds the weights: torch.compile, DataParallel and DDP wrap it."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # compiled graphs skip hooks on submodules
        if not isinstance(inner, nn.Module) and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module  # measured on one device, without DDP's per-forward buffer broadcast
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@dataclass(frozen=True)
class _TorchSnapshot:
    training: tuple[bool, ...]
    momenta: tuple[Any, ...]
    buffer_objects: tuple[tuple[nn.Module, str, torch.Tensor], ...]
    buffer_values: tuple[torch.Tensor, ...]
    parameter_data: tuple[tuple[nn.Parameter, torch.Tensor], ...]


class TorchModelAdapter(ModelAdapter):
    framework = "torch"

    def __init__(self, model: nn.Module):
        if isinstance(model, torch.jit.ScriptModule):
            raise InputError("TorchScript modules are not supported (their compiled forward cannot be observed "
                             "layer by layer); pass the eager nn.Module the script was made from")
        if not isinstance(model, nn.Module):
            raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model = unwrap(model)
        self._modules = list(model.modules())
        found = (make_layer(name or "<root>", m) for name, m in model.named_modules())
        self._norm: list[TorchLayer] = [layer for layer in found if layer is not None]
        self._train_flags, self._eval_flags = self._mode_flags()
        trains = dict(zip(self._modules, self._train_flags))
        for layer in self._norm:
            if layer.batch_stats_in_train:  # FrozenBatchNorm never does
                layer.batch_stats_in_train = trains[layer.module] or not layer.tracks_running_stats
        self._dropouts = [m for m, flag in trains.items() if flag and is_dropout_like(m) and _drop_rate(m) > 0]
        self._functional_dropout: bool | None = None  # unknown until the first train-mode forward
        self._flag_setters = [_training_setter(m) for m in self._modules]
        self._mode_tables: dict = {}

    def _mode_flags(self) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        """What the user's own model.train() and model.eval() do to every module's flag; whatever else
        they change on parameters (``requires_grad``) is put back."""
        before = [m.training for m in self._modules]
        grads = [(p, p.requires_grad) for p in self.model.parameters()
                 if not isinstance(p, nn.parameter.UninitializedParameter)]
        try:
            self.model.train()
            train = tuple(m.training for m in self._modules)
            self.model.eval()
            evaluation = tuple(m.training for m in self._modules)
        except Exception as error:
            raise InputError(f"the model's train()/eval() raised {type(error).__name__}: {error}") from error
        finally:
            for module, flag in zip(self._modules, before):
                module.training = flag
            for parameter, flag in grads:
                parameter.requires_grad_(flag)
        return train, evaluation

    def norm_layers(self) -> list[NormLayer]:
        return list(self._norm)

    def uninitialized_layers(self) -> list[str]:
        return [layer.name for layer in self._norm if isinstance(layer.module, nn.modules.lazy.LazyModuleMixin)
                and layer.module.has_uninitialized_params()]

    def has_dropout(self) -> bool:
        return bool(self._dropouts)

    def snapshot(self) -> _TorchSnapshot:
        # Every buffer, by object and value: the passes may move the model, swap norm buffers, and
        # model.train() may touch more than norm layers (spectral_norm's u and v).
        objects = tuple((module, key, value) for module in self._modules for key, value in module._buffers.items()
                        if isinstance(value, torch.Tensor) and not isinstance(value, nn.parameter.UninitializedBuffer))
        return _TorchSnapshot(
            training=tuple(m.training for m in self._modules),
            momenta=tuple(getattr(layer.module, "momentum", None) for layer in self._norm),
            buffer_objects=objects,
            buffer_values=tuple(value.detach().clone() for _m, _k, value in objects),
            parameter_data=tuple((p, p.data) for p in self.model.parameters()
                                 if not isinstance(p, nn.parameter.UninitializedParameter)),
        )

    def restore(self, snapshot: _TorchSnapshot) -> None:
        for layer in self._norm:
            layer.end_session()
        for parameter, data in snapshot.parameter_data:
            parameter.data = data  # undoes a move or a memory-format change, keeping the tensors
        with torch.no_grad():
            for (module, key, value), saved in zip(snapshot.buffer_objects, snapshot.buffer_values):
                module._buffers[key] = value
                value.copy_(saved)
        for module, training in zip(self._modules, snapshot.training):
            module.training = training
        for layer, momentum in zip(self._norm, snapshot.momenta):
            if hasattr(layer.module, "momentum"):
                layer.module.momentum = momentum

    def set_mode(self, mode: ForwardMode, *, batch_stats: frozenset[str] | None = None) -> None:
        """Runs twice a batch: the flags of each mode are worked out once and then only assigned."""
        key = (mode, batch_stats)
        if key not in self._mode_tables:
            self._mode_tables[key] = self._mode_table(mode, batch_stats)
        flags, scratch = self._mode_tables[key]
        for assign, flag in zip(self._flag_setters, flags):
            assign(flag)
        for layer, batch in zip(self._norm, scratch):
            layer.use_scratch() if batch else layer.use_live()

    def _mode_table(self, mode: ForwardMode, batch_stats: frozenset[str] | None):
        """Every module's ``training`` flag in ``mode``, and which norm layers run on batch statistics."""
        flags = dict(zip(self._modules, self._eval_flags if mode is ForwardMode.EVAL else self._train_flags))
        if mode is ForwardMode.NORM_TRAIN:
            flags.update((module, False) for module in self._dropouts)
        scratch = []
        for layer in self._norm:
            batch = mode is not ForwardMode.EVAL and (
                layer.batch_stats_in_train if batch_stats is None else layer.name in batch_stats)
            if mode is not ForwardMode.EVAL:
                flags[layer.module] = batch
            scratch.append(batch)
        return tuple(flags[module] for module in self._modules), tuple(scratch)

    @contextlib.contextmanager
    def forward_guard(self, mode: ForwardMode):
        """Dropout called as a function off in NORM_TRAIN: watched on the first such forward, then
        kept off only where it was found (the guard costs a little on every torch call)."""
        if mode is not ForwardMode.NORM_TRAIN or self._functional_dropout is False:
            yield
            return
        guard = FunctionalDropoutGuard()
        with guard:
            yield
        if self._functional_dropout is None:
            self._functional_dropout = guard.seen

    def save(self, path) -> None:
        """A state_dict: safetensors for ``.safetensors`` paths, else ``torch.save``."""
        if str(path).endswith(".safetensors"):
            try:
                from safetensors.torch import save_file
            except ImportError as error:
                from ..errors import BackendError

                raise BackendError("writing .safetensors needs the safetensors package: pip install safetensors") \
                    from error
            save_file(_unshared(self.model.state_dict()), str(path))
        else:
            torch.save(self.model.state_dict(), path)

    def clone_model(self) -> Any:
        import copy

        try:
            return copy.deepcopy(self.model)
        except Exception as error:  # a lock, an old-style weight_norm hook, an open file
            raise InputError(f"cannot copy the model ({type(error).__name__}: {error}); recalibrate it in place "
                             "instead (inplace=True)") from error

    def forward(self, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return self.model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self.model(*inputs)
        return self.model(inputs)

    def move_to(self, device: torch.device, *, channels_last: bool = False) -> None:
        current = next((t.device for t in self.model.parameters()), None)
        if current != device:
            self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def prepare_inputs(self, inputs: Any, device: torch.device, *, channels_last: bool = False) -> Any:
        return _to_device(inputs, device, channels_last)


def _training_setter(module: nn.Module):
    """``module.training = flag``; straight into the instance dict where that is all nn.Module's
    __setattr__ would do (it costs a dozen checks, on hundreds of modules, twice a batch)."""
    cls = type(module)
    plain = cls.__setattr__ is nn.Module.__setattr__ and not hasattr(cls, "training") \
        and "training" in module.__dict__
    if plain:
        return functools.partial(module.__dict__.__setitem__, "training")
    return functools.partial(setattr, module, "training")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): later names get their own copy,
    which load_state_dict copies back into the one shared parameter."""
    seen: set[int] = set()
    result = {}
    for key, value in state.items():
        value = value.detach()
        pointer = value.untyped_storage().data_ptr()
        result[key] = value.clone() if pointer in seen and value.numel() else value.contiguous()
        seen.add(pointer)
    return result


def _to_device(value: Any, device: torch.device, channels_last: bool) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.to(device, non_blocking=True)
        if channels_last and value.dim() == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        return value
    if isinstance(value, dict):
        return {k: _to_device(v, device, channels_last) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device, channels_last) for v in value)
    return value
