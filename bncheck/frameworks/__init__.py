"""Framework adapters: everything that knows how a framework's norm layers,
modes and forward calls work. The engine talks only to :class:`ModelAdapter`
and :class:`NormLayer`, so a new layer family joins here without touching it."""
from __future__ import annotations

from .base import ForwardMode, ModelAdapter, NormLayer


def adapter_for(model) -> ModelAdapter:
    """Pick the adapter for ``model``: Keras models when Keras is loaded, else PyTorch."""
    import sys

    if "keras" in sys.modules:
        from .keras_adapter import KerasModelAdapter, is_keras_model

        if is_keras_model(model):
            return KerasModelAdapter(model)
    from .torch_adapter import TorchModelAdapter

    return TorchModelAdapter(model)


__all__ = ["ForwardMode", "ModelAdapter", "NormLayer", "adapter_for"]
