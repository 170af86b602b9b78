"""The measuring engine: one load of each batch, a forward per mode on it.

For every batch of this process's shard: an eval-mode forward (running statistics), a train-mode
forward (the model's training mode with dropout off) during which every norm layer's hook records
its input statistics, and, on the first few batches of a model with dropout, the training mode
as it is. Scores and statistics accumulate on the device; at the end they move to the CPU once,
are exchanged between processes and merged exactly. Everything the engine touches is
snapshotted first and restored in ``finally``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .batches import batch_length, iter_tensors, split_batch
from .errors import BncheckError, DataError, ForwardError, NonFiniteError, ShapeMismatchError, summarize
from .frameworks import ForwardMode
from .gating import StopRule
from .outcomes import EVAL, TRAIN, OutcomeMeter, Outcomes, merge_outcomes
from .run import Run
from .stats import KERNEL_STATS_ROWS, InputStatsAccumulator, LayerInputStats, finalize, merge_states, resting_stats
from .tasks import SampleScores, Task, infer_task, score_samples, select_output

ProgressCallback = Callable[[int, "int | None"], None]
WITH_DROPOUT = "train_with_dropout"
TRAIN_ON_DROPOUT_BATCHES = "train@dropout_batches"   # train mode on the batches the dropout pass saw
_MODE_KEYS = {ForwardMode.EVAL: EVAL, ForwardMode.NORM_TRAIN: TRAIN, ForwardMode.FULL_TRAIN: WITH_DROPOUT}


@dataclass(frozen=True)
class PassSpec:
    """What one pass over the data does.

    ``dropout_batches``: the training mode with dropout on runs only on the plan's first batches.
    ``batch_stats``: norm layers that use batch statistics in the train modes (None: as the model's
    training mode has it). ``limit``: only the plan's first batches.
    """

    modes: tuple[ForwardMode, ...] = (ForwardMode.EVAL, ForwardMode.NORM_TRAIN)
    collect_stats: bool = True
    dropout_batches: int = 0
    batch_stats: frozenset[str] | None = None
    stop: StopRule | None = None
    limit: int | None = None
    scored: tuple[ForwardMode, ...] | None = None   # modes whose outputs are scored (None: every mode)


@dataclass(frozen=True)
class PassResult:
    task: Task
    outcomes: Outcomes
    layer_stats: dict[str, LayerInputStats]           # train mode (dropout off)
    dropout_layer_stats: dict[str, LayerInputStats] = field(default_factory=dict)   # dropout on, its batches
    dropout_base_stats: dict[str, LayerInputStats] = field(default_factory=dict)    # dropout off, the same
    order: dict[str, int] = field(default_factory=dict)   # forward order of each layer's first call
    stopped_early: bool = False

    @property
    def num_batches(self) -> int:
        return self.outcomes.batches

    @property
    def num_samples(self) -> int:
        return int(self.outcomes.get("samples"))


class LayerRecorder:
    """One norm layer's statistics in each measured mode; its hook writes to the active mode's."""

    def __init__(self, layer, batches_by_key: dict, order: list[str]):
        """``batches_by_key``: each measured mode and the most batches it will see (None: unknown)."""
        self.name, self._order = layer.name, order
        resting = _resting(layer) if batches_by_key else (None, None)
        self.accumulators = {key: InputStatsAccumulator(layer.channel_dim, layer.per_instance,
                                                        flush_every=_buffered_batches(batches), resting=resting)
                             for key, batches in batches_by_key.items()}
        self.active = False
        self._targets: tuple[InputStatsAccumulator, ...] = ()
        self._in_order = False

    def activate(self, *keys) -> None:
        """Record into the accumulators of ``keys`` (modes, or TRAIN_ON_DROPOUT_BATCHES); none: inactive."""
        self._targets = tuple(self.accumulators[k] for k in keys if k in self.accumulators)
        self.active = bool(self._targets)

    def _seen(self) -> None:
        if not self._in_order:
            self._order.append(self.name)
            self._in_order = True

    def record_input(self, x: torch.Tensor) -> None:
        self._seen()
        for target in self._targets:
            target.add(x)

    def record_batch_stats(self, count: float, mean: torch.Tensor, unbiased_var: torch.Tensor):
        """Returns where the layer's kernel may write the next batch's statistics (None: inactive)."""
        self._seen()
        rows = None
        # The accumulator whose row the kernel wrote goes last: a merge there frees the row.
        for target in sorted(self._targets, key=lambda t: t.offered(mean, unbiased_var)):
            rows = target.add_batch_stats(count, mean, unbiased_var)
        return rows


def _resting(layer) -> tuple:
    """What the layer shows as its running statistics during the measured forwards where its kernel
    writes into the recorder's rows: its own, as under ``model.train()``."""
    if not getattr(layer, "reads_kernel_stats", False):
        return None, None
    return resting_stats(layer.running_mean(), layer.running_var())


def _buffered_batches(batches: int | None) -> int:
    """Rows of kernel statistics a layer buffers before merging: no more than the batches it will
    see (the dropout pass sees one), so the buffers of wide models stay small."""
    return max(1, min(KERNEL_STATS_ROWS, batches if batches is not None else KERNEL_STATS_ROWS))


class Session:
    """The model ready for measured forwards: moved, hooked, protected; everything back on exit."""

    def __init__(self, run: Run, recorders: list[LayerRecorder], batch_stats: frozenset[str] | None = None):
        self.run, self.recorders, self.batch_stats = run, recorders, batch_stats
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Session":
        adapter, stack = self.run.adapter, self._stack
        snapshot = adapter.snapshot()
        stack.callback(adapter.restore, snapshot)
        try:
            stack.enter_context(caller_rng_kept(self.run))
            adapter.move_to(self.run.device, channels_last=self.run.channels_last)
            for layer, recorder in zip(self.run.layers, self.recorders):
                stack.callback(layer.add_stats_hook(recorder).remove)
            _local_sync_batchnorm(self.run, stack)
            stack.enter_context(adapter.no_grad())
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._stack.close()
        return False

    def forward(self, mode: ForwardMode, inputs: Any, index: int, *also_record) -> torch.Tensor:
        run = self.run
        run.adapter.set_mode(mode, batch_stats=self.batch_stats)
        for recorder in self.recorders:
            recorder.activate(mode, *also_record)
        if mode is ForwardMode.FULL_TRAIN:
            _seed_dropout(run, index)
        try:
            with run.adapter.forward_guard(mode), run.adapter.autocast(run.device, run.amp_dtype):
                raw = _forward(run.adapter, inputs, index)
        finally:
            for recorder in self.recorders:
                recorder.activate()
        scoring = run.scoring
        return select_output(run.adapter.output_to_tensor(raw), output_index=scoring.output_index,
                             output_key=scoring.output_key)


def caller_rng_kept(run: Run):
    """The passes may draw random numbers (dropout, the user's forward): the caller's generators are
    put back afterwards, so a diagnosis inside a training loop does not change what follows."""
    if run.framework != "torch":
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else [])


def _seed_dropout(run: Run, index: int) -> None:
    """Dropout masks seeded by the plan's seed and the batch, so they do not depend on how batches
    are shared between processes."""
    if run.framework != "torch":
        return
    seed = (run.plan.seed * 1_000_003 + index) % 2**63
    torch.random.default_generator.manual_seed(seed)
    if run.device.type == "cuda":
        with torch.cuda.device(run.device):
            torch.cuda.manual_seed(seed)


def _local_sync_batchnorm(run: Run, stack: contextlib.ExitStack) -> None:
    """SyncBatchNorm would pool batch statistics across the processes, each holding another batch,
    and refuses CPU inputs under any process group: for the passes it runs as a plain BatchNorm,
    so batches stay whole as in one process."""
    from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

    for layer in run.layers:
        module = getattr(layer, "module", None)
        if isinstance(module, SyncBatchNorm) and "forward" not in module.__dict__:
            module.forward = _BatchNorm.forward.__get__(module)
            stack.callback(module.__dict__.pop, "forward", None)


class DeferredChecks:
    """NaN/inf checks that wait for the device only every ``every`` batches (at once on the CPU)."""

    def __init__(self, device: torch.device):
        self.every = 1 if device.type == "cpu" else 32
        self._pending: list[tuple[torch.Tensor, str]] = []

    def nonfinite(self, value: Any, what: str) -> None:
        flags = [_has_nonfinite(t) for t in iter_tensors(value) if t.is_floating_point()]
        if flags:
            self._pending.append((torch.stack(flags).any(), what))
            if self.every == 1:
                self.flush()

    def maybe_flush(self, batches: int) -> None:
        if batches % self.every == 0:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for flag, what in pending:
            if bool(flag):
                raise NonFiniteError(f"{what} contain NaN or inf; clean the data (or the model) before diagnosing")


def _has_nonfinite(t: torch.Tensor) -> torch.Tensor:
    """A NaN or inf anywhere makes the sum NaN or inf. Summed in float64, finite values of a narrower
    dtype cannot overflow (3.4e38 times any count stays below 1.8e308), and one reduction costs a
    tenth of an elementwise ``isfinite`` over the batch."""
    if t.dtype == torch.float64:
        return ~torch.isfinite(t).all()
    return ~torch.isfinite(t.sum(dtype=torch.float64))


class LocalPass:
    """This process's share of a pass: feeds batches, keeps scores and statistics."""

    def __init__(self, run: Run, spec: PassSpec):
        self.run, self.spec = run, spec
        stat_modes = [m for m in spec.modes if m is not ForwardMode.EVAL] if spec.collect_stats else []
        if ForwardMode.FULL_TRAIN in stat_modes:
            stat_modes.append(TRAIN_ON_DROPOUT_BATCHES)  # the same batches with dropout off, to compare
        batches = run.plan.shard_length(run.world.rank, run.world.size, spec.limit)
        dropout_batches = spec.dropout_batches if batches is None else min(spec.dropout_batches, batches)
        batches_by_key = {key: batches if key is ForwardMode.NORM_TRAIN else dropout_batches for key in stat_modes}
        self.order: list[str] = []
        self.recorders = [LayerRecorder(layer, batches_by_key, self.order) for layer in run.layers]
        self.checks = DeferredChecks(run.device)
        self.task: Task | None = None
        self.meter: OutcomeMeter | None = None
        self.batches = 0
        # The first batch goes in as a copy to every forward, to find a forward that changes its input.
        self.copy_inputs: bool | None = None

    def session(self) -> Session:
        return Session(self.run, self.recorders, self.spec.batch_stats)

    def modes_for(self, index: int) -> tuple[ForwardMode, ...]:
        return tuple(m for m in self.spec.modes if m is not ForwardMode.FULL_TRAIN or index < self.spec.dropout_batches)

    def feed(self, session: Session, index: int, batch: Any) -> None:
        run = self.run
        inputs, targets = split_batch(batch, input_key=run.scoring.input_key, target_key=run.scoring.target_key)
        size = batch_length(inputs)
        if size < 2:
            return  # a lone sample cannot be batch-normalised (a DataLoader's last batch, say)
        inputs = run.adapter.prepare_inputs(inputs, run.device, channels_last=run.channels_last)
        targets = _as_tensor(targets, index)
        self.checks.nonfinite(inputs, f"inputs of batch {index}")
        self.checks.nonfinite(targets, f"targets of batch {index}")
        outputs = self._forward_modes(session, inputs, index)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(next(iter(outputs.values())).device, non_blocking=True)
        if self.task is None:
            first = outputs.get(ForwardMode.NORM_TRAIN, next(iter(outputs.values())))
            self.task = _infer_task(first, targets, run.scoring.loss_fn)
            self.meter = OutcomeMeter(self.task, first.device)
        self._score(outputs, targets, size, index)
        self.meter.end_batch(size)
        self.batches += 1
        self.checks.maybe_flush(self.batches)

    def _forward_modes(self, session: Session, inputs: Any, index: int) -> dict:
        modes, outputs, mutated = self.modes_for(index), {}, False
        for position, mode in enumerate(modes):
            also = (TRAIN_ON_DROPOUT_BATCHES,) if mode is ForwardMode.NORM_TRAIN and ForwardMode.FULL_TRAIN in modes \
                else ()
            given = _copy_tensors(inputs) if self.copy_inputs is not False else inputs
            output = session.forward(mode, given, index, *also)
            if self.copy_inputs is None:
                mutated |= any(t._version for t in iter_tensors(given))
            # A model may write every output into one buffer: keep each mode's own.
            outputs[mode] = output.clone() if position < len(modes) - 1 else output
            if mode is not ForwardMode.EVAL:  # NaN eval outputs are measured (corrupt stats), not refused
                self.checks.nonfinite(output, f"{mode.value}-mode outputs of batch {index}")
        if self.copy_inputs is None:
            self.copy_inputs = mutated  # every mode must see the batch as loaded
        return outputs

    def _score(self, outputs: dict, targets: Any, size: int, index: int) -> None:
        meter = self.meter
        scored = self.spec.scored or tuple(outputs)
        scores = {mode: _score(self.task, out, targets, self.run.scoring.loss_fn, index)
                  for mode, out in outputs.items() if mode in scored}
        for mode, score in scores.items():
            meter.add_mode(_MODE_KEYS[mode], score, size)
        if ForwardMode.FULL_TRAIN in scores and ForwardMode.NORM_TRAIN in scores:
            meter.add_mode(TRAIN_ON_DROPOUT_BATCHES, scores[ForwardMode.NORM_TRAIN], size)
        if ForwardMode.EVAL in outputs:
            # Corrupt running stats (NaN, negative variance) break eval mode alone: measure it.
            meter.add_eval_finiteness(outputs[ForwardMode.EVAL])
        if ForwardMode.EVAL in scores and ForwardMode.NORM_TRAIN in scores:
            meter.add_pair(scores[ForwardMode.EVAL], scores[ForwardMode.NORM_TRAIN], outputs[ForwardMode.EVAL],
                           outputs[ForwardMode.NORM_TRAIN])
        some = next(iter(outputs.values()))
        meter.add_labels(targets, int(some.shape[1]) if some.dim() >= 2 else 2)

    def outcomes(self) -> Outcomes:
        return self.meter.partial() if self.meter is not None else Outcomes()

    def payload(self) -> dict:
        """What this process contributes to the pass, on the CPU."""
        self.checks.flush()
        states = {mode: {r.name: (r.accumulators[mode].finish(), r.accumulators[mode].calls)
                         for r in self.recorders} for mode in self._stat_modes()}
        return {"task": self.task, "outcomes": self.outcomes(), "states": states, "order": list(self.order)}

    def _stat_modes(self):
        return list(self.recorders[0].accumulators) if self.recorders else []


def run_pass(run: Run, spec: PassSpec, progress: ProgressCallback | None = None) -> PassResult:
    """Run this process's batches of the plan through ``spec.modes`` and combine with the other processes."""
    local = LocalPass(run, spec)
    with local.session() as session:
        stopped = _drive(run, spec, local, session, progress)
    return combine(run, local.payload() | {"stopped": stopped})


def _drive(run: Run, spec: PassSpec, local: LocalPass, session: Session, progress) -> bool:
    """Feed the shard; with a stop rule, exchange the sums after every round of batches and stop
    when the verdict is settled. Returns whether it stopped early."""
    world = run.world
    batches = _loading(run.plan.shard(world.rank, world.size, limit=spec.limit))
    total = run.plan.shard_length(world.rank, world.size, spec.limit)
    done = look = 0
    while True:
        item = next(batches, None)
        if item is not None:
            local.feed(session, *item)
            done += 1
            if progress is not None:
                progress(done, total)
        if spec.stop is None:
            if item is None:
                return False
            continue
        parts = world.exchange((local.task, local.outcomes(), item is None))
        if all(exhausted for _t, _o, exhausted in parts):
            return False
        look += 1
        task = next((t for t, _o, _e in parts if t is not None), None)
        if spec.stop.settled(task, merge_outcomes(o for _t, o, _e in parts), look):
            return True


def combine(run: Run, payload: dict) -> PassResult:
    parts = run.world.exchange(payload)
    tasks = {part["task"] for part in parts if part["task"] is not None}
    if not tasks:
        raise DataError("the data yielded no batch with 2 or more samples")
    if len(tasks) > 1:
        raise DataError(f"the processes' data read as different tasks ({', '.join(sorted(t.value for t in tasks))})")
    outcomes = merge_outcomes(part["outcomes"] for part in parts)
    if outcomes.out_of_range_targets:
        raise ShapeMismatchError(f"targets hold class {outcomes.largest_class} but the model outputs "
                                 f"{outcomes.num_outputs} classes ({outcomes.out_of_range_targets} targets out of "
                                 "range); check --num-classes or the targets")
    stats = {mode: _merged_stats(parts, mode) for mode in parts[0]["states"]}
    order = next((part["order"] for part in parts if part["order"]), [])
    return PassResult(tasks.pop(), outcomes, stats.get(ForwardMode.NORM_TRAIN, {}),
                      stats.get(ForwardMode.FULL_TRAIN, {}), stats.get(TRAIN_ON_DROPOUT_BATCHES, {}),
                      {name: i for i, name in enumerate(order)}, any(part["stopped"] for part in parts))


def _merged_stats(parts: list[dict], mode: ForwardMode) -> dict[str, LayerInputStats]:
    merged = {}
    for name in parts[0]["states"][mode]:
        state, calls = None, 0
        for part in parts:
            part_state, part_calls = part["states"][mode][name]
            state, calls = merge_states(state, part_state), calls + part_calls
        result = finalize(state, calls)
        if result is not None:
            merged[name] = result
    return merged


def _loading(batches):
    """The user's batches, with a failure to load or collate one as a DataError."""
    count = 0
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except BncheckError:
            raise
        except (Exception, SystemExit) as error:  # sys.exit in a dataset is a failure to load, too
            raise _load_failure(count, error) from error
        count += 1
        yield item


def _load_failure(index: int, error: BaseException) -> DataError:
    """A hint that fits the failure: a collate shape mismatch, a file that cannot be read, or user code."""
    text = summarize(error)
    if isinstance(error, OSError) or type(error).__name__ == "DecompressionBombError":  # PIL's errors too
        hint = "check that the data files exist, are readable, are not damaged and are not too large to open"
    elif "equal size" in text or "same size" in text or "must match" in text:
        hint = "samples must share one shape: pass --image-size for an image folder, or pad them in a collate_fn"
    else:
        hint = "check the dataset's __getitem__ and the loader's collate_fn"
    return DataError(f"cannot load batch {index}: {text}; {hint}")


def _forward(adapter, inputs: Any, index: int) -> Any:
    try:
        return adapter.forward(inputs)
    except (Exception, SystemExit) as error:  # any failure inside user code is an input problem, not a crash
        first_line = summarize(error)
        shapes = [tuple(t.shape) for t in iter_tensors(inputs)]
        shape_text = shapes[0] if len(shapes) == 1 else shapes
        cls = ShapeMismatchError if any(w in first_line for w in ("shape", "size", "mat1", "dimension", "channels")) \
            else ForwardError
        raise cls(f"the model's forward failed on batch {index} with inputs {shape_text}: {first_line}") from error


def _infer_task(outputs: torch.Tensor, targets: Any, loss_fn) -> Task:
    try:
        return infer_task(outputs, targets, has_loss_fn=loss_fn is not None)
    except BncheckError:
        raise
    except Exception as error:
        raise DataError(f"cannot score outputs {tuple(outputs.shape)} against targets of type "
                        f"{type(targets).__name__}: {error}; yield targets as a tensor") from error


def _copy_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy_tensors(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_tensors(v) for v in value)
    return value


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


def _score(task: Task, outputs: torch.Tensor, targets: Any, loss_fn, index: int) -> SampleScores:
    try:
        return score_samples(task, outputs, targets, loss_fn)
    except ShapeMismatchError:
        raise
    except (Exception, SystemExit) as error:
        if loss_fn is not None:
            raise ForwardError(f"loss_fn raised on batch {index}: {type(error).__name__}: {error}") from error
        raise ShapeMismatchError(
            f"cannot score batch {index}: outputs {tuple(outputs.shape)}, targets "
            f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}: "
            f"{summarize(error)}"
        ) from error
