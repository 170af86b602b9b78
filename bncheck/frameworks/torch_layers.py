"""PyTorch norm layers: how each family keeps running statistics and how bncheck reads them.

* :class:`BatchNormLayer`: every ``_NormBase`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, Lazy
  variants, InstanceNorm with running stats, subclasses such as timm's BatchNormAct2d).
* :class:`FrozenNormLayer`: FrozenBatchNorm2d of torchvision, detectron2 and timm (weights and
  running statistics held as buffers, applied in both modes, so no train/eval gap by construction).
* :class:`RunningStatsLayer`: any other module that registers ``running_mean``/``running_var``
  buffers and switches on ``self.training`` (timm's EvoNorm2dB0 keeps only ``running_var``).

In the train modes a layer that normalises with batch statistics runs on scratch buffers, so
the model's own running statistics never move; they start as copies of its own (where finite),
which is what a forward that reads them (QAT's fused ConvBn scales its weights by them) would see
under ``model.train()``. A BatchNorm layer then runs with momentum 1, so
its kernel leaves each batch's mean and unbiased variance in those buffers, where a forward hook
reads them (fvcore's PreciseBN does the same). The scratch buffers are rows of the recorder's own
buffer, and after each batch the hook points them at the next free row: the kernel writes every
batch's statistics where they will be merged, and nothing is copied per layer and batch.

Where the kernel is not exact enough (half precision buffers, channels-last input on the CPU,
whose kernel sums in float32) or does not compute the statistics, the hook reads the input
itself in float64. So it does for subclasses
with a forward of their own (a fixed momentum, split batches), whose buffers may not hold the batch's
statistics, and for a layer whose input mean is far from zero against its spread, where the
float32 buffer's rounding of the mean would show against the spread.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from ..stats import resting_stats
from .base import NormLayer, StatsRecorder

_RUNNING = ("running_mean", "running_var")
_EXACT_BUFFER_DTYPES = (torch.float32, torch.float64)
# Forwards known to pass the module's momentum and buffers to F.batch_norm unchanged.
_KERNEL_FORWARDS = frozenset({
    "torch.nn.modules.batchnorm:_BatchNorm.forward",
    "torch.nn.modules.batchnorm:SyncBatchNorm.forward",
    "timm.layers.norm_act:BatchNormAct2d.forward",
    "timm.layers.norm_act:SyncBatchNormAct.forward",
})
# Above this |mean| / std the float32 buffer's rounding of the mean (6e-8 of |mean|) exceeds
# 1e-6 of the spread: such layers are read from their input instead.
_MAX_KERNEL_MEAN_RATIO = 10.0


def _registered(module: nn.Module, name: str) -> bool:
    return isinstance(module._buffers.get(name), torch.Tensor)


def is_frozen_norm(module: nn.Module) -> bool:
    """FrozenBatchNorm-style: weight, bias and running statistics are all buffers."""
    return not isinstance(module, _NormBase) and all(
        _registered(module, key) for key in ("weight", "bias", "running_mean", "running_var"))


def is_running_stats_module(module: nn.Module) -> bool:
    """Another module that keeps running statistics in registered buffers."""
    return not isinstance(module, _NormBase) and not is_frozen_norm(module) and any(
        _registered(module, key) for key in _RUNNING)


def make_layer(name: str, module: nn.Module) -> "TorchLayer | None":
    if isinstance(module, _NormBase):
        return BatchNormLayer(name, module)
    if is_frozen_norm(module):
        return FrozenNormLayer(name, module)
    if is_running_stats_module(module):
        return RunningStatsLayer(name, module)
    return None


class TorchLayer(NormLayer):
    """What the PyTorch families share: buffers, hooks and protected running statistics."""

    framework = "torch"
    reads_kernel_stats = False

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self._live: dict[str, torch.Tensor] | None = None
        self._scratch: dict[str, torch.Tensor] = {}

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def num_features(self) -> int | None:
        stat = self.running_var() if self.running_var() is not None else self.running_mean()
        return None if stat is None else int(stat.numel())

    @property
    def eps(self) -> float:
        return float(getattr(self.module, "eps", 1e-5))

    @property
    def tracks_running_stats(self) -> bool:
        return any(_registered(self.module, key) for key in _RUNNING)

    @property
    def is_training(self) -> bool:
        return bool(self.module.training)

    def _buffer(self, name: str) -> torch.Tensor | None:
        value = self.module._buffers.get(name)
        if value is None or isinstance(value, nn.parameter.UninitializedBuffer):
            return None
        return value.detach().to("cpu", torch.float64)

    def running_mean(self) -> torch.Tensor | None:
        return self._buffer("running_mean")

    def running_var(self) -> torch.Tensor | None:
        return self._buffer("running_var")

    def num_batches_tracked(self) -> int | None:
        return None

    def add_stats_hook(self, recorder: StatsRecorder):
        def pre_hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if recorder.active and isinstance(x, torch.Tensor):
                recorder.record_input(x)

        return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def write_running_stats(self, mean, biased_var, unbiased_var, num_batches: int = 0) -> None:
        # PyTorch stores the unbiased variance (InstanceNorm: the mean of per-instance ones).
        with torch.no_grad():
            for key, value in (("running_mean", mean), ("running_var", unbiased_var)):
                buffer = self.module._buffers.get(key)
                if isinstance(buffer, torch.Tensor):
                    buffer.copy_(value.to(buffer))

    # -- protection of the running statistics during train-mode forwards --------------------

    def use_scratch(self) -> None:
        """Normalise-with-batch-statistics forwards update scratch copies, never the real buffers."""
        buffers = self.module._buffers
        if self._live is None:
            self._live = {k: buffers[k] for k in _RUNNING if _registered(self.module, k)}
            # Copies, as under model.train(), where finite: momentum 1 computes 0 * old + batch.
            mean, var = resting_stats(self._live.get("running_mean"), self._live.get("running_var"))
            self._scratch = {k: v for k, v in (("running_mean", mean), ("running_var", var)) if v is not None}
        buffers.update(self._scratch)

    def use_live(self) -> None:
        if self._live is not None:
            self.module._buffers.update(self._live)

    def end_session(self) -> None:
        self._live, self._scratch = None, {}


class BatchNormLayer(TorchLayer):
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
    def reads_kernel_stats(self) -> bool:
        buffer = self.module._buffers.get("running_var")
        forward = type(self.module).forward
        return (self.tracks_running_stats and not self.per_instance and isinstance(buffer, torch.Tensor)
                and buffer.dtype in _EXACT_BUFFER_DTYPES
                and f"{forward.__module__}:{forward.__qualname__}" in _KERNEL_FORWARDS)

    def num_batches_tracked(self) -> int | None:
        if self.per_instance:
            # F.instance_norm updates running stats but never counts updates: the buffer stays 0.
            return None
        value = self.module._buffers.get("num_batches_tracked")
        if value is None or isinstance(value, nn.parameter.UninitializedBuffer):
            return None
        return int(value.item())

    def add_stats_hook(self, recorder: StatsRecorder):
        if not self.reads_kernel_stats:
            return super().add_stats_hook(recorder)
        checked = []  # the first batch decides whether the kernel's statistics are precise enough

        def post_hook(module, args, kwargs, _output):
            x = args[0] if args else kwargs.get("input")
            if not recorder.active or not isinstance(x, torch.Tensor):
                return
            if module.training and _kernel_is_exact(x):
                buffers = module._buffers
                mean, var = buffers["running_mean"], buffers["running_var"]
                if not checked:
                    checked.append(_mean_is_moderate(mean, var))
                if checked[0]:
                    rows = recorder.record_batch_stats(x.numel() // x.shape[1], mean, var)
                    if rows is not None and module is self.module:  # not a replica's (DataParallel)
                        self._write_next_batch_into(*rows)
                    return
            recorder.record_input(x)

        return self.module.register_forward_hook(post_hook, with_kwargs=True)

    def _write_next_batch_into(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """The kernel (momentum 1) then leaves the next batch's statistics where the recorder keeps
        them, so no copy is made per layer and batch. Only scratch buffers are ever replaced."""
        buffers, scratch = self.module._buffers, self._scratch
        if scratch and buffers["running_mean"] is scratch["running_mean"]:
            scratch["running_mean"] = buffers["running_mean"] = mean
            scratch["running_var"] = buffers["running_var"] = unbiased_var

    def use_scratch(self) -> None:
        super().use_scratch()
        if self.module.momentum != 1.0:  # the scratch buffers then hold exactly this batch's statistics
            self.module.momentum = 1.0

    def write_running_stats(self, mean, biased_var, unbiased_var, num_batches: int = 0) -> None:
        super().write_running_stats(mean, biased_var, unbiased_var)
        counter = self.module._buffers.get("num_batches_tracked")
        if num_batches and counter is not None and not self.per_instance:
            with torch.no_grad():
                counter.add_(num_batches)  # the statistics now reflect that many more batches


def _kernel_is_exact(x: torch.Tensor) -> bool:
    """The CPU kernel sums contiguous inputs in float64 but channels-last ones in float32;
    the CUDA kernels use float32 Welford reductions (about 1e-7 relative)."""
    return x.is_cuda or (x.is_cpu and x.is_contiguous())


def _mean_is_moderate(mean: torch.Tensor, unbiased_var: torch.Tensor) -> bool:
    """|mean| <= 10 std on every channel, both finite; a threshold, so the buffers' precision will do."""
    moderate = torch.le(mean.abs(), unbiased_var.sqrt() * _MAX_KERNEL_MEAN_RATIO) & torch.isfinite(unbiased_var)
    return bool(moderate.all())


class FrozenNormLayer(TorchLayer):
    """Running statistics applied in both modes: they cannot cause a train/eval gap, but their drift
    against the data shows a preprocessing or domain mismatch. To recompute them (``--include-frozen``)
    the statistics pass normalises them with batch statistics, as a BatchNorm in train mode would, so
    the layers after them see what they will see once the statistics are exact."""

    batch_stats_in_train = False
    momentum = None
    update_weight = 0.0

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self._batch_hook = None

    @property
    def params_frozen(self) -> bool:
        return True

    @property
    def is_training(self) -> bool:
        return False

    def use_scratch(self) -> None:
        if self._batch_hook is None:
            self._batch_hook = self.module.register_forward_hook(_normalise_with_batch_stats)

    def use_live(self) -> None:
        self.end_session()

    def end_session(self) -> None:
        super().end_session()
        if self._batch_hook is not None:
            self._batch_hook.remove()
            self._batch_hook = None


def _normalise_with_batch_stats(module, args, _output):
    x = args[0]
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) * torch.rsqrt(var + getattr(module, "eps", 1e-5)) * module.weight.view(shape) \
        + module.bias.view(shape)


class RunningStatsLayer(TorchLayer):
    """A module outside torch.nn's norm classes with running statistics it switches on ``self.training``;
    bncheck assumes they track its input's per-channel moments, as BatchNorm's do."""

    @property
    def momentum(self) -> float | None:
        value = getattr(self.module, "momentum", None)
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def update_weight(self) -> float | None:
        return self.momentum

    @property
    def params_frozen(self) -> bool:
        params = list(self.module.parameters(recurse=False))
        return bool(params) and not any(p.requires_grad for p in params)

