"""Keras ResNet50 fit on three images: 100% accuracy in fit(), 33% from evaluate() on the same images.

Seeds 000/001, with Keras 3 itself (PyTorch backend): ``keras.applications.ResNet50`` from scratch
(weights=None) on 48x48 images, trained for 5 epochs of one batch. Every
BatchNormalization keeps Keras' default momentum 0.99, so after 5 updates the moving mean/variance
still weigh their 0/1 initial values at 0.99**5 = 95%: fit() (batch statistics) is right, evaluate()
(moving statistics) is not: here it gives all three images the same class (which images it misses
depends on the CPU's float kernels, see README.md).

    bncheck diagnose examples/keras_resnet50_three_images/model.py     # trains first: 10-40 s on 2 cores

See README.md for the .keras file workflow, recalibration and the numbers.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # bncheck drives Keras on the PyTorch backend

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZE = 48     # small and fast; at 32x32 (ResNet50's minimum) the last stage is 1x1 and fit() is erratic
EPOCHS = 5    # as in the story: model.fit(imgs, y, epochs=5, shuffle=True)
SEED = 0


def images() -> tuple[np.ndarray, np.ndarray]:
    """Three distinct synthetic RGB patterns, raw pixel values 0..255 (NHWC), labels 0, 1, 2."""
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    stripes = (i // (SIZE // 8)) % 2                          # horizontal stripes, red
    checker = ((i // (SIZE // 4)) + (j // (SIZE // 4))) % 2   # checkerboard, green
    ring = (i - SIZE / 2) ** 2 + (j - SIZE / 2) ** 2 < (SIZE / 3) ** 2  # a disc, blue
    x = np.zeros((3, SIZE, SIZE, 3), dtype=np.float32)
    for k, (pattern, channel) in enumerate([(stripes, 0), (checker, 1), (ring, 2)]):
        x[k] = 40.0
        x[k, :, :, channel] = 40.0 + 200.0 * pattern
    return x, np.arange(3)


def compile_model(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def build_model(verbose: int = 0):
    """ResNet50 trained on the three images, returned as fit() leaves it."""
    keras.utils.set_random_seed(SEED)
    model = keras.applications.ResNet50(weights=None, classes=3, input_shape=(SIZE, SIZE, 3),
                                        classifier_activation=None)  # logits: bncheck's loss equals Keras'
    compile_model(model)
    x, y = images()
    model.fit(x, y, epochs=EPOCHS, shuffle=True, verbose=verbose)
    return model


def get_dataloader():
    """The same three images: one batch of (inputs NHWC, targets) as torch tensors."""
    x, y = images()
    return torch.as_tensor(x), torch.as_tensor(y)
