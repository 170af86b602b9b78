"""Metrics of every mode and the paired train/eval outcomes behind the gap's interval.

:class:`OutcomeMeter` adds per-sample scores into named float64 sums on the device, so the
batch loop never waits for the host; :meth:`OutcomeMeter.partial` moves them to the CPU once.
:class:`Outcomes` are plain sums: those of several processes add up exactly
(:func:`merge_outcomes`), and the metrics, the gap and its intervals are pure functions of them.

Sums (``eval``/``train`` paired per sample, ``t`` train-mode, ``e`` eval-mode):

* per mode ``M``: ``M.loss`` (summed element losses) and ``M.correct``, with the element counts
  ``M.loss_elements``, ``M.scored`` and ``M.samples``;
* accuracy pairs: ``acc.n`` samples, ``acc.t``/``acc.e`` correct elements, ``acc.te`` samples right
  in both modes (binary outcomes);
* ratios over batches ``K`` (``acc``: ``D`` = correct elements in train minus eval mode, ``T`` =
  scored elements; ``loss``: ``D`` = eval minus train loss, ``T`` = train loss; ``agreeb``: ``D`` =
  disagreeing samples, ``T`` = samples): ``K.units``, ``K.d``, ``K.t``, ``K.dd``, ``K.tt``, ``K.dt``;
* label-free agreement: ``agree.n``, ``agree.a``, ``agree.aa``, and ``diverge`` (relative output
  distance); label balance: ``labels.share``, ``labels.batches``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .intervals import (
    Interval,
    PairedTable,
    RatioSums,
    paired_difference_interval,
    ratio_interval,
    wilson_interval,
)
from .report import ModeMetrics
from .tasks import SampleScores, Task, class_labels, majority_share, prediction_agreement, relative_divergence

EVAL, TRAIN = "eval", "train"


@dataclass(frozen=True)
class Outcomes:
    """Sums over the samples one process (or several, merged) scored."""

    sums: dict[str, float] = field(default_factory=dict)
    binary_accuracy: bool = True       # every sample scored one element: paired proportions apply
    binary_agreement: bool = True      # one prediction per sample (not a dense map)
    classes_seen: frozenset[int] = frozenset()
    out_of_range_targets: int = 0
    largest_class: int = -1            # the largest class target seen
    num_outputs: int = 0               # the model's output classes (outputs.shape[1])
    nonfinite_eval_batches: int = 0
    batches: int = 0

    def get(self, name: str) -> float:
        return self.sums.get(name, 0.0)


def merge_outcomes(parts) -> Outcomes:
    sums: dict[str, float] = defaultdict(float)
    merged = Outcomes()
    binary, agreement, classes, bad, nonfinite, batches = True, True, set(), 0, 0, 0
    largest, outputs = -1, 0
    for part in parts:
        largest, outputs = max(largest, part.largest_class), max(outputs, part.num_outputs)
        for name, value in part.sums.items():
            sums[name] += value
        binary &= part.binary_accuracy
        agreement &= part.binary_agreement
        classes |= part.classes_seen
        bad, nonfinite, batches = bad + part.out_of_range_targets, nonfinite + part.nonfinite_eval_batches, \
            batches + part.batches
    if not batches:
        return merged
    return Outcomes(dict(sums), binary, agreement, frozenset(classes), bad, largest, outputs, nonfinite, batches)


class OutcomeMeter:
    """Adds each batch's scores into float64 sums that stay on the device."""

    def __init__(self, task: Task, device: torch.device):
        self.task, self.device = task, device
        self._device_sums: dict[str, torch.Tensor] = {}
        self._host_sums: dict[str, float] = defaultdict(float)
        self._binary = self._binary_agreement = True
        self._seen: torch.Tensor | None = None
        self._bad = torch.zeros((), dtype=torch.int64, device=device)
        self._largest = torch.full((), -1, dtype=torch.int64, device=device)
        self._num_outputs = 0
        self._nonfinite_eval = torch.zeros((), dtype=torch.int64, device=device)
        self._batches = 0

    def _add(self, name: str, value: torch.Tensor) -> None:
        current = self._device_sums.get(name)
        if current is None:
            self._device_sums[name] = value.detach().to(torch.float64, copy=True)
        else:
            current.add_(value)  # in place: no new small tensor per batch

    def add_mode(self, key: str, scores: SampleScores, samples: int) -> None:
        self._host_sums[f"{key}.samples"] += samples
        if scores.loss is not None:
            self._add(f"{key}.loss", scores.loss.sum())
            self._host_sums[f"{key}.loss_elements"] += scores.loss_elements
        if scores.correct is not None:
            self._add(f"{key}.correct", scores.correct.sum())
            self._host_sums[f"{key}.scored"] += scores.scored * samples
        if scores.out_of_range is not None:
            self._bad += scores.out_of_range
            self._largest = torch.maximum(self._largest, scores.largest_class.long())

    def add_pair(self, ev: SampleScores, tr: SampleScores, eval_out: torch.Tensor, train_out: torch.Tensor) -> None:
        """The paired outcomes of one batch in eval and train mode: per sample for the paired
        proportions, per batch (the units of the ratio intervals) for the rest."""
        if ev.correct is not None and tr.correct is not None:
            m = float(tr.scored)
            self._binary &= tr.scored == 1
            for name, value in (("acc.t", tr.correct.sum()), ("acc.e", ev.correct.sum()),
                                ("acc.te", (tr.correct * ev.correct).sum())):
                self._add(name, value)
            self._host_sums["acc.n"] += len(tr.correct)
            self._add_unit("acc", (tr.correct - ev.correct).sum(), len(tr.correct) * m)
        if ev.loss is not None and tr.loss is not None:
            self._add_unit("loss", (ev.loss - tr.loss).sum(), tr.loss.sum())
        agreement = prediction_agreement(eval_out, train_out)
        self._binary_agreement &= eval_out.dim() <= 2
        self._add("agree.a", agreement.sum())
        self._add("agree.aa", agreement.pow(2).sum())
        self._add("diverge", relative_divergence(eval_out, train_out).sum())
        self._host_sums["agree.n"] += len(agreement)
        self._add_unit("agreeb", len(agreement) - agreement.sum(), float(len(agreement)))

    def _add_unit(self, key: str, d: torch.Tensor, t) -> None:
        """One batch's numerator ``d`` and denominator ``t`` of a ratio, and their squares and product."""
        for name, value in ((f"{key}.d", d), (f"{key}.dd", d * d), (f"{key}.dt", d * t)):
            self._add(name, value)
        if isinstance(t, torch.Tensor):
            self._add(f"{key}.t", t)
            self._add(f"{key}.tt", t * t)
        else:
            self._host_sums[f"{key}.t"] += t
            self._host_sums[f"{key}.tt"] += t * t
        self._host_sums[f"{key}.units"] += 1

    def add_labels(self, targets, num_outputs: int) -> None:
        self._num_outputs = num_outputs
        labels = class_labels(self.task, targets)
        if labels is None:
            return
        classes = max(num_outputs, 2)
        self._add("labels.share", majority_share(labels, classes))
        self._host_sums["labels.batches"] += 1
        if self._seen is None:
            self._seen = torch.zeros(classes, dtype=torch.bool, device=self.device)
        self._seen[labels.long().clamp(0, len(self._seen) - 1)] = True

    def add_eval_finiteness(self, eval_out: torch.Tensor) -> None:
        self._nonfinite_eval += (~torch.isfinite(eval_out.float())).any().long()

    def end_batch(self, samples: int) -> None:
        self._batches += 1
        self._host_sums["samples"] += samples

    def partial(self) -> Outcomes:
        """The sums so far, moved to the CPU in one go."""
        names = list(self._device_sums)
        values = torch.stack([self._device_sums[n].reshape(()) for n in names]).cpu().tolist() if names else []
        sums = dict(self._host_sums)
        sums.update(zip(names, values))
        seen = frozenset() if self._seen is None else frozenset(self._seen.nonzero().flatten().cpu().tolist())
        return Outcomes(sums, self._binary, self._binary_agreement, seen, int(self._bad), int(self._largest),
                        self._num_outputs, int(self._nonfinite_eval), self._batches)


# --------------------------------------------------------------------------- pure views of the sums


def mode_metrics(outcomes: Outcomes, key: str) -> ModeMetrics | None:
    samples = outcomes.get(f"{key}.samples")
    if not samples:
        return None
    elements, scored = outcomes.get(f"{key}.loss_elements"), outcomes.get(f"{key}.scored")
    loss = outcomes.get(f"{key}.loss") / elements if elements else None
    accuracy = outcomes.get(f"{key}.correct") / scored if scored else None
    return ModeMetrics(loss, accuracy, int(samples))


def accuracy_gap_interval(outcomes: Outcomes, z: float) -> Interval | None:
    """Train-minus-eval accuracy: Newcombe's paired interval for one outcome per sample, else the
    ratio interval over samples (pixels or labels of one sample are not independent)."""
    n = outcomes.get("acc.n")
    if not n:
        return None
    if outcomes.binary_accuracy:
        table = PairedTable.from_sums(n, outcomes.get("acc.t"), outcomes.get("acc.e"), outcomes.get("acc.te"))
        return paired_difference_interval(table, z)
    return ratio_interval(_unit_sums(outcomes, "acc"), z)


def _unit_sums(outcomes: Outcomes, key: str) -> RatioSums:
    s = outcomes.get
    return RatioSums(s(f"{key}.units"), s(f"{key}.d"), s(f"{key}.t"), s(f"{key}.dd"), s(f"{key}.tt"), s(f"{key}.dt"))


def relative_loss_interval(outcomes: Outcomes, z: float) -> Interval | None:
    """(eval loss - train loss) / train loss, from per-batch loss differences."""
    return ratio_interval(_unit_sums(outcomes, "loss"), z)


def disagreement_interval(outcomes: Outcomes, z: float) -> Interval | None:
    """Share of samples whose predictions differ: Wilson for one prediction per sample, else the
    ratio interval over batches of the per-sample disagreement."""
    n, agree = outcomes.get("agree.n"), outcomes.get("agree.a")
    if not n:
        return None
    if outcomes.binary_agreement:
        return wilson_interval(n - agree, n, z)
    return ratio_interval(_unit_sums(outcomes, "agreeb"), z)
