"""Keras' own numbers for both stages, and files for the bncheck commands in README.md.

    python demo.py train OUT_DIR        # pretrain, freeze + head, unfreeze + fine-tune; print fit() and
                                        # evaluate() accuracy after each stage; write OUT_DIR/frozen.keras,
                                        # OUT_DIR/finetuned.keras and OUT_DIR/domain_b.npz (NHWC, for --data)
    python demo.py evaluate FILE.keras  # model.evaluate on domain B
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model as example  # noqa: E402  (sets KERAS_BACKEND=torch before importing keras)
import numpy as np  # noqa: E402


def _report(stage: str, model) -> None:
    x, y = example.domain_b()
    fit_accuracy = model.history.history["accuracy"][-1]
    loss, accuracy = model.evaluate(x, y, verbose=0)
    print(f"{stage}: last fit() epoch accuracy {fit_accuracy:.4f}; evaluate() on domain B: "
          f"loss {loss:.4f}, accuracy {accuracy:.4f}")


def train(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = example.build_frozen_model()
    _report("frozen base + new head", model)
    model.save(out_dir / "frozen.keras")
    example.fine_tune(model)
    _report("unfrozen, fine-tuned  ", model)
    model.save(out_dir / "finetuned.keras")
    x, y = example.domain_b()
    np.savez(out_dir / "domain_b.npz", x=x, y=y)
    print(f"{time.perf_counter() - start:.1f} s; wrote frozen.keras, finetuned.keras and domain_b.npz in {out_dir}")


def evaluate(path: Path) -> None:
    import keras

    model = keras.saving.load_model(path, compile=False)
    example._compile(model, 1e-3)
    x, y = example.domain_b()
    loss, accuracy = model.evaluate(x, y, verbose=0)
    print(f"{path.name}: model.evaluate on domain B: loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("train", "evaluate"):
        sys.exit(__doc__)
    (train if sys.argv[1] == "train" else evaluate)(Path(sys.argv[2]))
