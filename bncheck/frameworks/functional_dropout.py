"""Dropout called as a function, which no module flag turns off.

timm's classifier heads and EfficientNet, torchvision's DenseNet layers and many attention blocks
call ``F.dropout(x, p, training=self.training)`` or pass ``dropout_p`` to
``scaled_dot_product_attention``. Under ``model.train()`` those stay on even with every dropout
module in eval. :class:`FunctionalDropoutGuard` runs a forward with them off (dropout becomes the
identity, as in eval mode) and records whether any was on. A function mode costs a little on every
torch call, so the adapter uses it on the first train-mode forward and afterwards only for a model
where it found functional dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# func -> (position of p, position of the training flag); the input is the first argument.
_DROPOUT_FUNCTIONS = {
    F.dropout: (1, 2), F.dropout1d: (1, 2), F.dropout2d: (1, 2), F.dropout3d: (1, 2),
    F.alpha_dropout: (1, 2), F.feature_alpha_dropout: (1, 2),
    torch.dropout: (1, 2), torch.feature_dropout: (1, 2), torch.alpha_dropout: (1, 2),
    torch.feature_alpha_dropout: (1, 2),
}
_ATTENTION = F.scaled_dot_product_attention
_ATTENTION_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_ATTENTION_DROPOUT_POSITION = _ATTENTION_NAMES.index("dropout_p")
# nn.MultiheadAttention's function: the calls inside a handled function are not seen again.
_MULTI_HEAD = F.multi_head_attention_forward
_MULTI_HEAD_DROPOUT_POSITION = 10


def _argument(args, kwargs, position: int, names: tuple[str, ...], default):
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), default)


class FunctionalDropoutGuard(TorchFunctionMode):
    """Dropout functions return their input; attention runs with ``dropout_p=0``."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        positions = _DROPOUT_FUNCTIONS.get(func)
        if positions is not None:
            p = _argument(args, kwargs, positions[0], ("p",), 0.5)
            training = _argument(args, kwargs, positions[1], ("training", "train"), True)
            self.seen |= bool(training) and float(p) > 0
            return args[0] if args else kwargs["input"]
        if func is _ATTENTION:
            p = _argument(args, kwargs, _ATTENTION_DROPOUT_POSITION, ("dropout_p",), 0.0)
            if float(p) > 0:
                self.seen = True
                kwargs = {**dict(zip(_ATTENTION_NAMES[3:], args[3:])), **kwargs, "dropout_p": 0.0}
                args = args[:3]
        if func is _MULTI_HEAD:
            p = _argument(args, kwargs, _MULTI_HEAD_DROPOUT_POSITION, ("dropout_p",), 0.0)
            if float(p) > 0 and kwargs.get("training", True):
                self.seen = True
                args, kwargs = _replace(args, kwargs, _MULTI_HEAD_DROPOUT_POSITION, "dropout_p", 0.0)
        return func(*args, **kwargs)


def _replace(args, kwargs, position: int, name: str, value):
    if len(args) > position:
        return args[:position] + (value,) + args[position + 1:], kwargs
    return args, {**kwargs, name: value}
