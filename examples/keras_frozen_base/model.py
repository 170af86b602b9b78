"""Seed 002 in Keras 3: transfer learning with a frozen BatchNorm base, then fine-tuning it.

A small convolutional base with BatchNormalization is "pretrained" on domain A (8x8 digits as
scanned, pixels in [0, 1]); a new head is then trained on domain B (the same kind of digits from a
scanner with 2x contrast and +1 brightness). Two factories:

* ``build_frozen_model`` -- ``base.trainable = False``, new head fitted on domain B. In Keras 2 (the
  story) frozen BN layers normalised with batch statistics in ``fit`` but with the stale domain-A
  moving statistics in ``evaluate``. Keras 3 runs a ``trainable=False`` BatchNormalization in
  inference mode, in ``fit`` too, so training and inference agree: bncheck PASSES.

      bncheck diagnose examples/keras_frozen_base/model.py:build_frozen_model

* ``build_model`` -- then the usual second stage: ``base.trainable = True`` and a short fine-tune
  on domain B, with the base called as ``base(inputs)`` (no ``training=False``). Now the BN layers
  normalise with domain-B batch statistics in ``fit``, while their moving statistics (momentum 0.99)
  move only ~1% per step away from domain A: the weights adapt to batch statistics within a few
  dozen steps, the moving statistics do not, and ``evaluate`` drops. bncheck FAILS (stats-mismatch).

      bncheck diagnose examples/keras_frozen_base/model.py
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # bncheck drives Keras on the PyTorch backend

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

BATCH = 64
PRETRAIN_EPOCHS = 5
HEAD_EPOCHS = 5
FINETUNE_EPOCHS = 3   # 39 steps: the moving statistics keep 0.99**39 = 68% of domain A


def _digits():
    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]  # NHWC: (1797, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], d.target[order].astype("int64")


def domain_a():
    x, y = _digits()
    return x[:1000], y[:1000]


def domain_b():
    x, y = _digits()
    return x[1000:] * 2.0 + 1.0, y[1000:]  # the new scanner: contrast x2, brightness +1


def _compile(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])


def _base():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
    ], name="base")


def build_frozen_model(verbose: int = 0):
    """Pretrain the base on domain A, freeze it, fit a new head on domain B (Keras 3: consistent)."""
    keras.utils.set_random_seed(0)
    base = _base()
    pretrained = keras.Sequential([base, keras.layers.Dense(10, name="head_a")])
    _compile(pretrained, 3e-3)  # stands in for the downloaded ImageNet weights
    pretrained.fit(*domain_a(), batch_size=BATCH, epochs=PRETRAIN_EPOCHS, verbose=verbose)

    base.trainable = False  # Keras 3: its BN layers now also run in inference mode
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head_b")(base(inputs)))  # no training=False
    _compile(model, 3e-3)
    model.fit(*domain_b(), batch_size=BATCH, epochs=HEAD_EPOCHS, verbose=verbose)
    return model


def fine_tune(model, verbose: int = 0):
    """Unfreeze the base and fine-tune everything on domain B for a few steps."""
    keras.utils.set_random_seed(1)  # the same batches whatever ran before
    model.get_layer("base").trainable = True  # its BN layers use batch statistics in fit() again
    _compile(model, 1e-3)  # recompile after changing trainable
    model.fit(*domain_b(), batch_size=BATCH, epochs=FINETUNE_EPOCHS, verbose=verbose)
    return model


def build_model(verbose: int = 0):
    """The frozen model, then ``base.trainable = True`` and a short fine-tune on domain B."""
    return fine_tune(build_frozen_model(verbose), verbose)


def get_dataloader():
    """Domain B, the data the model is used on: (inputs NHWC, targets) as torch tensors."""
    x, y = domain_b()
    return torch.as_tensor(x), torch.as_tensor(y)
