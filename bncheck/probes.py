"""Cheap probes of the model beside the measuring passes.

``eval_batch_dependence`` runs one batch through eval mode twice, the second time with its second half
replaced by a copy of the first: with every norm layer on its running statistics, a sample's output must
not depend on which other samples share its batch. When it does, something outside the norm layers uses batch statistics in eval mode
(``x - x.mean(0)`` in forward, say). Everything touched is restored in ``finally``.
"""
from __future__ import annotations

from typing import Any

import torch

from .batches import BatchPlan, batch_length, split_batch
from .frameworks import ForwardMode, ModelAdapter
from .tasks import select_output

PROBE_SAMPLES = 4       # at most this many samples of the batch are probed (two against two)
ROUNDING_FLOOR = 1e-4   # relative output changes below this are rounding, whatever the dtype


def first_batch(plan: BatchPlan) -> Any:
    """The plan's first batch, or None when reading it would use up one-shot data."""
    if not plan.reiterable:
        return None
    return next(iter(plan.batches), None)


def eval_batch_dependence(adapter: ModelAdapter, batch: Any, device: torch.device, *, scoring=None) -> float | None:
    """The largest relative change of a sample's eval-mode output when the other half of its batch is
    replaced (``|a - b| / |a|`` per sample, over the first half of the batch), 0.0 when within the output
    dtype's rounding. Both batches have the same size, so the same kernels run on them. None when the batch
    has fewer than 4 samples, or when eval mode is not even repeatable on the same batch (randomness in
    forward, which is no batch dependence)."""
    if batch is None:
        return None
    inputs, _ = split_batch(batch, input_key=getattr(scoring, "input_key", None),
                            target_key=getattr(scoring, "target_key", None))
    half = min(batch_length(inputs), PROBE_SAMPLES) // 2
    if half < 2:
        return None
    size = batch_length(inputs)
    given = list(range(2 * half))
    first_half_twice = list(range(half)) * 2
    snapshot = adapter.snapshot()
    try:
        adapter.move_to(device)
        adapter.set_mode(ForwardMode.EVAL)
        with adapter.no_grad():
            reference = _output(adapter, _rows(inputs, given, size), device, scoring)[:half]
            other = _output(adapter, _rows(inputs, first_half_twice, size), device, scoring)[:half]
            change = _relative_change(reference, other)
            if change <= _rounding(reference):
                return 0.0
            # Only now worth a third forward: a model that is random in eval mode changes anyway.
            again = _output(adapter, _rows(inputs, given, size), device, scoring)[:half]
    except Exception:  # the passes already ran this model on this batch: a probe never fails a diagnosis
        return None
    finally:
        adapter.restore(snapshot)
    return None if _relative_change(reference, again) > _rounding(reference) else change


def _rounding(output: torch.Tensor) -> float:
    """Kernels may sum in another order at another batch size: allow that, at least a few rounding steps of
    the dtype (float32 kernels differ by about 1e-6 relative, bfloat16 by about 1e-2)."""
    return max(ROUNDING_FLOOR, 16 * torch.finfo(output.dtype).eps) if output.is_floating_point() else 0.0


def _output(adapter: ModelAdapter, inputs: Any, device: torch.device, scoring) -> torch.Tensor:
    raw = adapter.forward(adapter.prepare_inputs(inputs, device))
    out = select_output(adapter.output_to_tensor(raw), output_index=getattr(scoring, "output_index", None),
                        output_key=getattr(scoring, "output_key", None))
    return out.detach()


def _rows(value: Any, index: list[int], size: int) -> Any:
    """The samples at ``index`` of a batch's inputs (tensors and arrays of ``size`` rows, in dicts and
    tuples); anything else, such as a tensor shared by the whole batch, is passed as it is."""
    if isinstance(value, dict):
        return {key: _rows(item, index, size) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(item, index, size) for item in value)
    if not hasattr(value, "shape") or not len(value.shape) or value.shape[0] != size:
        return value
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(index, device=value.device)]
    return value[index]  # a NumPy array


def _relative_change(reference: torch.Tensor, other: torch.Tensor) -> float:
    a = reference.reshape(len(reference), -1).double().cpu()
    b = other.reshape(len(other), -1).double().cpu()
    scale = a.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((a - b).norm(dim=1) / scale).max())
