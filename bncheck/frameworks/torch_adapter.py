"""PyTorch adapter: every ``_NormBase`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm,
Lazy variants, InstanceNorm with running stats, subclasses such as timm's
BatchNormAct2d)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from .base import ForwardMode, ModelAdapter, NormLayer

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NormBase)


class TorchNormLayer(NormLayer):
    framework = "torch"

    def __init__(self, name: str, module: _NormBase):
        self.name = name
        self.module = module

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def num_features(self) -> int | None:
        return int(self.module.num_features)

    @property
    def momentum(self) -> float | None:
        return self.module.momentum

    @property
    def update_weight(self) -> float | None:
        if self.per_instance and self.module.momentum is None:
            return 0.0  # F.instance_norm is called with momentum 0 then: the stats never move
        return self.module.momentum

    @property
    def eps(self) -> float:
        return float(self.module.eps)

    @property
    def tracks_running_stats(self) -> bool:
        return bool(self.module.track_running_stats) and self.module.running_mean is not None

    @property
    def per_instance(self) -> bool:
        return isinstance(self.module, _InstanceNorm)

    @property
    def params_frozen(self) -> bool:
        params = [p for p in (self.module.weight, self.module.bias) if p is not None]
        return bool(params) and not any(p.requires_grad for p in params)

    @property
    def is_training(self) -> bool:
        return bool(self.module.training)

    def _buffer(self, name: str) -> torch.Tensor | None:
        value = getattr(self.module, name, None)
        if value is None or isinstance(value, nn.parameter.UninitializedBuffer):
            return None
        return value.detach().to("cpu", torch.float64)

    def running_mean(self) -> torch.Tensor | None:
        return self._buffer("running_mean")

    def running_var(self) -> torch.Tensor | None:
        return self._buffer("running_var")

    def num_batches_tracked(self) -> int | None:
        if self.per_instance:
            # F.instance_norm updates running stats but never counts updates: the buffer stays 0.
            return None
        value = getattr(self.module, "num_batches_tracked", None)
        if value is None or isinstance(value, nn.parameter.UninitializedBuffer):
            return None
        return int(value.item())

    def add_input_hook(self, fn: Callable[[torch.Tensor], None]):
        def pre_hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if x is not None:
                fn(x)

        return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def write_running_stats(self, mean, biased_var, unbiased_var, num_batches: int = 0) -> None:
        # PyTorch stores the unbiased variance; InstanceNorm stores the mean of per-instance
        # unbiased variances, which the caller passes in unbiased_var.
        with torch.no_grad():
            self.module.running_mean.copy_(mean.to(self.module.running_mean))
            self.module.running_var.copy_(unbiased_var.to(self.module.running_var))
            counter = getattr(self.module, "num_batches_tracked", None)
            if num_batches and counter is not None and not self.per_instance:
                counter.add_(num_batches)  # the statistics now reflect that many more batches


@dataclass(frozen=True)
class _TorchSnapshot:
    training: tuple[bool, ...]
    momenta: tuple[Any, ...]
    buffers: dict[str, torch.Tensor]
    device: torch.device | None


class TorchModelAdapter(ModelAdapter):
    framework = "torch"

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            from ..errors import InputError

            raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
        # A torch.compile'd module runs a captured graph that skips Python hooks on its
        # submodules; measure the eager original, which shares its parameters and buffers.
        original = getattr(model, "_orig_mod", None)
        if isinstance(original, nn.Module):
            model = original
        self.model = model
        self._modules = list(model.modules())
        self._norm = [TorchNormLayer(name or "<root>", m) for name, m in model.named_modules() if is_norm_module(m)]

    def norm_layers(self) -> list[NormLayer]:
        return list(self._norm)

    def uninitialized_layers(self) -> list[str]:
        return [layer.name for layer in self._norm if isinstance(layer.module, nn.modules.lazy.LazyModuleMixin)
                and layer.module.has_uninitialized_params()]

    def has_dropout(self) -> bool:
        return any(isinstance(m, _DROPOUT_TYPES) and m.p > 0 for m in self._modules)

    def _device(self) -> torch.device | None:
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            if not isinstance(tensor, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)):
                return tensor.device
        return None

    def snapshot(self) -> _TorchSnapshot:
        # Every buffer: the model.train() pass may touch more than norm layers (spectral_norm's u and v).
        buffers = {name: value.detach().clone() for name, value in self.model.named_buffers()
                   if value is not None and not isinstance(value, nn.parameter.UninitializedBuffer)}
        return _TorchSnapshot(
            training=tuple(m.training for m in self._modules),
            momenta=tuple(layer.module.momentum for layer in self._norm),
            buffers=buffers,
            device=self._device(),
        )

    def restore(self, snapshot: _TorchSnapshot) -> None:
        if snapshot.device is not None and self._device() != snapshot.device:
            self.model.to(snapshot.device)
        for module, training in zip(self._modules, snapshot.training):
            module.training = training
        with torch.no_grad():
            for layer, momentum in zip(self._norm, snapshot.momenta):
                layer.module.momentum = momentum
            for name, value in self.model.named_buffers():
                saved = snapshot.buffers.get(name)
                if saved is not None and value is not None:
                    value.copy_(saved.to(value.device))

    def set_mode(self, mode: ForwardMode, *, keep_eval: frozenset[str] = frozenset()) -> None:
        self.model.train(mode is ForwardMode.FULL_TRAIN)
        for layer in self._norm:
            layer.module.train(mode is not ForwardMode.EVAL and layer.name not in keep_eval)
            if mode is not ForwardMode.EVAL:
                # momentum 0 makes the EMA update a no-op: running = 1*running + 0*batch.
                layer.module.momentum = 0.0

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

    def forward(self, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return self.model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self.model(*inputs)
        return self.model(inputs)

    def move_to(self, device: torch.device) -> None:
        if self._device() != device:
            self.model.to(device)

    def prepare_inputs(self, inputs: Any, device: torch.device) -> Any:
        return _to_device(inputs, device)


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


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value
