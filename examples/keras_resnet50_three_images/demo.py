"""Train, evaluate and save the three-image ResNet50, or evaluate a saved (e.g. recalibrated) one.

    python demo.py train OUT_DIR        # fit 5 epochs, evaluate, write OUT_DIR/resnet50_three_images.keras
                                        # and OUT_DIR/three_images.npz (the images, NHWC, for --data)
    python demo.py evaluate FILE.keras  # model.evaluate on the same three images
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model as example  # noqa: E402  (sets KERAS_BACKEND=torch before importing keras)
import numpy as np  # noqa: E402


def train(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = example.build_model(verbose=2)
    print(f"build + fit: {time.perf_counter() - start:.1f} s")
    x, y = example.images()
    loss, accuracy = model.evaluate(x, y, verbose=0)
    print(f"model.evaluate on the same images: loss {loss:.4f}, accuracy {accuracy:.4f}")
    print("predicted classes:", model.predict(x, verbose=0).argmax(axis=-1).tolist(), "true:", y.tolist())
    model.save(out_dir / "resnet50_three_images.keras")  # compiled: the file keeps the optimizer's 5 steps
    np.savez(out_dir / "three_images.npz", x=x, y=y)
    print(f"wrote {out_dir / 'resnet50_three_images.keras'} and {out_dir / 'three_images.npz'}")


def evaluate(path: Path) -> None:
    import keras

    model = example.compile_model(keras.saving.load_model(path, compile=False))
    x, y = example.images()
    loss, accuracy = model.evaluate(x, y, verbose=0)
    print(f"{path.name}: model.evaluate loss {loss:.4f}, accuracy {accuracy:.4f}")
    print("predicted classes:", model.predict(x, verbose=0).argmax(axis=-1).tolist(), "true:", y.tolist())


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("train", "evaluate"):
        sys.exit(__doc__)
    (train if sys.argv[1] == "train" else evaluate)(Path(sys.argv[2]))
