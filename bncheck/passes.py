"""The measuring engine: one load of each batch, several forwards on it.

For every batch: an eval-mode forward (running statistics), a train-mode forward
(only norm layers use batch statistics, running statistics frozen) during which
forward pre-hooks stream each norm layer's true input statistics, and, when the
model has dropout, the framework's full training mode. Everything the engine
touches is snapshotted first and restored in ``finally``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .batches import batch_length, iter_tensors, split_batch
from .errors import BncheckError, DataError, ForwardError, NonFiniteError, ShapeMismatchError, summarize
from .frameworks import ForwardMode, ModelAdapter
from .stats import InputStatsAccumulator, LayerInputStats
from .tasks import (
    MetricAccumulator,
    Metrics,
    Task,
    infer_task,
    majority_share,
    prediction_agreement,
    relative_divergence,
    score_batch,
    select_output,
)

ProgressCallback = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class ScoringOptions:
    loss_fn: Callable | None = None
    output_index: int | None = None
    output_key: str | None = None
    input_key: str | None = None
    target_key: str | None = None


@dataclass(frozen=True)
class PassResult:
    task: Task
    metrics: dict[ForwardMode, Metrics]
    agreement: float | None          # share of samples whose eval and train-mode predictions agree
    output_divergence: float | None  # mean ||eval - train|| / ||train|| per sample
    layer_stats: dict[str, LayerInputStats]
    dropout_layer_stats: dict[str, LayerInputStats] = field(default_factory=dict)
    num_batches: int = 0
    num_samples: int = 0
    nonfinite_eval_batches: int = 0   # batches whose eval-mode outputs held NaN or inf
    mean_majority_share: float | None = None
    num_classes_seen: int | None = None


def run_passes(
    adapter: ModelAdapter,
    batches: Iterable,
    *,
    device: torch.device,
    modes: tuple[ForwardMode, ...] = (ForwardMode.EVAL, ForwardMode.NORM_TRAIN),
    collect_stats: bool = True,
    scoring: ScoringOptions = ScoringOptions(),
    progress: ProgressCallback | None = None,
    total_batches: int | None = None,
    keep_eval: frozenset[str] = frozenset(),
) -> PassResult:
    """Run every batch through ``modes``; norm layers in ``keep_eval`` always use their running stats."""
    layers = adapter.norm_layers()
    accumulators: dict[ForwardMode, dict[str, InputStatsAccumulator]] = {
        mode: {layer.name: InputStatsAccumulator(layer.channel_dim, layer.per_instance) for layer in layers}
        for mode in modes
        if collect_stats and mode is not ForwardMode.EVAL
    }
    state = {"mode": None}

    def hook_for(name: str):
        def on_input(x):
            active = accumulators.get(state["mode"])
            if active is not None and isinstance(x, torch.Tensor):
                active[name].add(x)
        return on_input

    scores = {mode: MetricAccumulator() for mode in modes}
    agree = [0.0, 0]
    diverge = [0.0, 0]
    shares: list[float] = []
    classes_seen: set[int] = set()
    task: Task | None = None
    num_batches = num_samples = nonfinite_eval = 0

    snapshot = adapter.snapshot()
    handles = []
    try:
        adapter.move_to(device)
        handles = [layer.add_input_hook(hook_for(layer.name)) for layer in layers]
        with adapter.no_grad():
            for index, batch in enumerate(_loaded(batches)):
                inputs, targets = split_batch(batch, input_key=scoring.input_key, target_key=scoring.target_key)
                size = batch_length(inputs)
                if size < 2:
                    # A lone sample cannot be batch-normalised (a DataLoader's last batch, say).
                    continue
                _check_finite(inputs, f"inputs of batch {index}")
                inputs = adapter.prepare_inputs(inputs, device)
                targets = _as_tensor(targets, index)
                _check_finite(targets, f"targets of batch {index}")  # a NaN target is bad data, not a gap
                if isinstance(targets, torch.Tensor):
                    targets = targets.to(device)
                outputs = {}
                for mode in modes:
                    state["mode"] = mode
                    adapter.set_mode(mode, keep_eval=keep_eval)
                    raw = _forward(adapter, inputs, index)
                    out = select_output(adapter.output_to_tensor(raw), output_index=scoring.output_index,
                                        output_key=scoring.output_key)
                    if mode is ForwardMode.EVAL:
                        # Corrupt running stats (NaN, negative variance) break eval mode alone: measure it.
                        nonfinite_eval += int(not bool(torch.isfinite(out.float()).all()))
                    else:
                        _check_finite(out, f"{mode.value}-mode outputs of batch {index}")
                    outputs[mode] = out
                state["mode"] = None
                if task is None:
                    first = outputs.get(ForwardMode.NORM_TRAIN, next(iter(outputs.values())))
                    task = _infer_task(first, targets, scoring)
                for mode, out in outputs.items():
                    scores[mode].add(_score(task, out, targets, scoring.loss_fn, index), size)
                if ForwardMode.EVAL in outputs and ForwardMode.NORM_TRAIN in outputs:
                    _add(agree, prediction_agreement(outputs[ForwardMode.EVAL], outputs[ForwardMode.NORM_TRAIN]))
                    _add(diverge, relative_divergence(outputs[ForwardMode.EVAL], outputs[ForwardMode.NORM_TRAIN]))
                share = majority_share(targets) if task in (Task.CLASSIFICATION, Task.BINARY, Task.CUSTOM) else None
                if share is not None:
                    shares.append(share)
                    classes_seen.update(torch.unique(targets).tolist())
                num_batches += 1
                num_samples += size
                if progress is not None:
                    progress(num_batches, total_batches)
    finally:
        for handle in handles:
            handle.remove()
        adapter.restore(snapshot)

    if task is None:
        raise DataError("the data yielded no batch with 2 or more samples")
    stats = {m: {name: result for name, result in ((n, acc.result()) for n, acc in accs.items())
                 if result is not None}
             for m, accs in accumulators.items()}
    return PassResult(
        task=task,
        metrics={mode: acc.result() for mode, acc in scores.items()},
        agreement=agree[0] / agree[1] if agree[1] else None,
        output_divergence=diverge[0] / diverge[1] if diverge[1] else None,
        layer_stats=stats.get(ForwardMode.NORM_TRAIN, {}),
        dropout_layer_stats=stats.get(ForwardMode.FULL_TRAIN, {}),
        num_batches=num_batches,
        num_samples=num_samples,
        nonfinite_eval_batches=nonfinite_eval,
        mean_majority_share=sum(shares) / len(shares) if shares else None,
        num_classes_seen=len(classes_seen) if shares else None,
    )


def _loaded(batches: Iterable):
    """Iterate the user's batches, turning a failure to load or collate one into a DataError."""
    iterator = iter(batches)
    index = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except BncheckError:
            raise
        except Exception as error:
            raise _load_failure(index, error) from error
        yield batch
        index += 1


def _load_failure(index: int, error: Exception) -> DataError:
    """A hint that fits the failure: a collate shape mismatch, a file that cannot be read, or user code."""
    text = summarize(error)
    if isinstance(error, OSError) or type(error).__name__ == "DecompressionBombError":  # PIL's errors too
        hint = "check that the data files exist, are readable, are not damaged and are not too large to open"
    elif "equal size" in text or "same size" in text or "must match" in text:
        hint = "samples must share one shape: pass --image-size for an image folder, or pad them in a collate_fn"
    else:
        hint = "check the dataset's __getitem__ and the loader's collate_fn"
    return DataError(f"cannot load batch {index}: {text}; {hint}")


def _add(acc: list, pair: tuple[float, int]) -> None:
    acc[0] += pair[0]
    acc[1] += pair[1]


def _check_finite(value: Any, what: str) -> None:
    for tensor in iter_tensors(value):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{what} contain NaN or inf; clean the data (or the model) before diagnosing")


def _forward(adapter: ModelAdapter, inputs: Any, index: int) -> Any:
    try:
        return adapter.forward(inputs)
    except Exception as error:  # any failure inside user code is an input problem, not a crash
        first_line = summarize(error)
        shapes = [tuple(t.shape) for t in iter_tensors(inputs)]
        shape_text = shapes[0] if len(shapes) == 1 else shapes
        cls = ShapeMismatchError if any(w in first_line for w in ("shape", "size", "mat1", "dimension", "channels")) \
            else ForwardError
        raise cls(f"the model's forward failed on batch {index} with inputs {shape_text}: {first_line}") from error


def _infer_task(outputs: torch.Tensor, targets: Any, scoring: ScoringOptions) -> Task:
    try:
        return infer_task(outputs, targets, has_loss_fn=scoring.loss_fn is not None)
    except BncheckError:
        raise
    except Exception as error:
        raise DataError(f"cannot score outputs {tuple(outputs.shape)} against targets of type "
                        f"{type(targets).__name__}: {error}; yield targets as a tensor") from error


def _as_tensor(targets: Any, index: int) -> Any:
    """Targets given as a list of numbers become a tensor; boolean labels class indices, as in data files."""
    if targets is None or isinstance(targets, dict):
        return targets
    if not isinstance(targets, torch.Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DataError(f"targets of batch {index} are a {type(targets).__name__} that is not a tensor of "
                            "numbers; yield (inputs, targets) with targets a tensor") from error
    if targets.is_complex():
        raise DataError(f"targets of batch {index} are complex numbers; yield class indices or real values")
    return targets.long() if targets.dtype == torch.bool else targets


def _score(task, outputs, targets, loss_fn, index):
    if isinstance(targets, torch.Tensor) and targets.device != outputs.device:
        targets = targets.to(outputs.device)  # Keras places outputs on its own device
    try:
        return score_batch(task, outputs, targets, loss_fn)
    except ShapeMismatchError:
        raise
    except Exception as error:
        if loss_fn is not None:
            raise ForwardError(f"loss_fn raised on batch {index}: {type(error).__name__}: {error}") from error
        raise ShapeMismatchError(
            f"cannot score batch {index}: outputs {tuple(outputs.shape)}, targets "
            f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}: "
            f"{summarize(error)}"
        ) from error
