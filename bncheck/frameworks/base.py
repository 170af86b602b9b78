"""The small interfaces the engine relies on."""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch


class ForwardMode(enum.Enum):
    EVAL = "eval"                # inference mode: every norm layer uses its running statistics
    NORM_TRAIN = "train"         # the model's training mode with dropout and stochastic depth off
    FULL_TRAIN = "train_with_dropout"  # the model's training mode as it is (dropout on)


class StatsRecorder(Protocol):
    """Where a norm layer's hook sends what it sees; ``active`` is False outside measured forwards."""

    active: bool

    def record_input(self, x: torch.Tensor) -> None: ...

    def record_batch_stats(self, count: float, mean: torch.Tensor, unbiased_var: torch.Tensor
                           ) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """Takes a batch's kernel statistics; returns the (mean, unbiased var) buffers the layer's
        kernel may write the next batch's into, so that they need no copy (None: no such buffers)."""


class NormLayer(ABC):
    """One normalisation layer that keeps (or could keep) running statistics.

    Conventions are PyTorch's unless a property says otherwise: ``update_weight``
    is the weight of the new batch in the moving average (PyTorch ``momentum``,
    Keras ``1 - momentum``). ``batch_stats_in_train`` says whether the layer normalises
    with batch statistics in the model's training mode (the adapter sets it).
    """

    name: str
    framework: str = "torch"
    batch_stats_in_train: bool = True

    @property
    @abstractmethod
    def type_name(self) -> str: ...

    @property
    @abstractmethod
    def num_features(self) -> int | None: ...

    @property
    @abstractmethod
    def momentum(self) -> float | None:
        """Momentum in the framework's own convention, as the user wrote it."""

    @property
    @abstractmethod
    def update_weight(self) -> float | None:
        """Weight of each new batch in the moving average; None means a cumulative average."""

    @property
    @abstractmethod
    def eps(self) -> float: ...

    @property
    @abstractmethod
    def tracks_running_stats(self) -> bool: ...

    @property
    def per_instance(self) -> bool:
        """True when running statistics average per-instance statistics (InstanceNorm)."""
        return False

    @property
    def channel_dim(self) -> int:
        return 1

    @property
    def stores_unbiased_variance(self) -> bool:
        return True

    @property
    @abstractmethod
    def params_frozen(self) -> bool:
        """True when the affine parameters exist and none of them is trainable."""

    @property
    @abstractmethod
    def is_training(self) -> bool:
        """Whether the layer would normalise with batch statistics as the model is now."""

    @abstractmethod
    def running_mean(self) -> torch.Tensor | None: ...

    @abstractmethod
    def running_var(self) -> torch.Tensor | None: ...

    @abstractmethod
    def num_batches_tracked(self) -> int | None: ...

    @abstractmethod
    def add_stats_hook(self, recorder: StatsRecorder) -> Any:
        """Send every call's input statistics to ``recorder``; returns a handle with ``remove()``."""

    @abstractmethod
    def write_running_stats(self, mean: torch.Tensor, biased_var: torch.Tensor, unbiased_var: torch.Tensor,
                            num_batches: int = 0) -> None:
        """Replace the running statistics (recalibration); the layer picks its variance convention and
        counts ``num_batches`` more updates where it keeps a counter."""

    @property
    def source_module(self):
        """The framework object, for identity checks (a module called twice)."""
        return getattr(self, "module", None)


class ModelAdapter(ABC):
    """What the engine needs from a model: its norm layers, modes, forward and state."""

    framework: str = "torch"
    model: Any

    @abstractmethod
    def norm_layers(self) -> list[NormLayer]: ...

    @abstractmethod
    def has_dropout(self) -> bool:
        """Whether the training mode runs dropout or stochastic depth that NORM_TRAIN turns off."""

    @abstractmethod
    def snapshot(self) -> Any:
        """Everything the engine may touch: buffers, momenta, mode flags, device."""

    @abstractmethod
    def restore(self, snapshot: Any) -> None: ...

    @abstractmethod
    def set_mode(self, mode: ForwardMode, *, batch_stats: frozenset[str] | None = None) -> None:
        """Put the model in ``mode`` with its running statistics protected from updates. In the train
        modes, the norm layers named in ``batch_stats`` normalise with batch statistics and the others
        with their running statistics; None keeps what the model's training mode does."""

    @abstractmethod
    def forward(self, inputs: Any) -> Any: ...

    @abstractmethod
    def move_to(self, device: torch.device, *, channels_last: bool = False) -> None: ...

    @abstractmethod
    def prepare_inputs(self, inputs: Any, device: torch.device, *, channels_last: bool = False) -> Any:
        """Move a batch's inputs where the model runs and into the form it takes."""

    def device_used(self, requested: torch.device) -> torch.device:
        """Where the passes actually run (the requested device, unless the framework decides)."""
        return requested

    def clone_model(self) -> Any:
        """An independent copy of the model, for changes the caller did not ask to make in place."""
        import copy

        from ..errors import InputError, summarize

        try:
            return copy.deepcopy(self.model)
        except Exception as error:  # a lock, an open file, old-style weight_norm's non-leaf tensors
            raise InputError(f"cannot copy the model to recalibrate the copy ({type(error).__name__}: "
                             f"{summarize(error, 160)}); recalibrate it in place instead (inplace=True)") from error

    def save(self, path) -> None:
        """Write the model's weights and buffers to ``path`` in the framework's own format."""
        torch.save(self.model.state_dict(), path)

    def output_to_tensor(self, output: Any) -> Any:
        return output

    def forward_guard(self, mode: ForwardMode):
        """A context around each forward in ``mode`` (PyTorch: functional dropout off in NORM_TRAIN)."""
        import contextlib

        return contextlib.nullcontext()

    def no_grad(self):
        return torch.no_grad()

    def autocast(self, device: torch.device, dtype: torch.dtype | None):
        """Forwards under mixed precision; a no-op context when ``dtype`` is None."""
        import contextlib

        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)
