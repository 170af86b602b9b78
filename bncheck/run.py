"""A run, resolved once: the model adapter and its norm layers, the device and precision, the batch
plan, how outputs are scored, and the processes the data is shared over.

``diagnose``, ``recalibrate``, ``inspect`` and the attribution take a :class:`Run` instead of
threading the same options through every call. :class:`RunOptions` is what a user chooses;
``RunOptions.from_keywords`` turns the flat keyword arguments of the public calls into it and
rejects bad values with a typed error.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .arguments import check_integer, check_seed
from .batches import BatchPlan, plan_batches
from .distributed import DEFAULT_TIMEOUT_S, World, current_world
from .errors import DataError, InputError, NoNormLayersError
from .frameworks import ModelAdapter, NormLayer, adapter_for

AMP_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class ScoringOptions:
    """How a batch and the model's output are read: which part is the prediction, which the target."""

    loss_fn: Callable | None = None
    output_index: int | None = None
    output_key: str | None = None
    input_key: str | None = None
    target_key: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """What the user chooses for a run. ``amp``: ``"bf16"`` or ``"fp16"`` autocast for the forwards;
    ``distributed``: share the data over an initialised torch.distributed process group."""

    device: str = "auto"
    batch_size: int | None = None
    seed: int = 0
    max_batches: int | None = None
    max_samples: int | None = None
    amp: str | None = None
    channels_last: bool = False
    distributed: bool = True
    dist_timeout: float = DEFAULT_TIMEOUT_S
    scoring: ScoringOptions = field(default_factory=ScoringOptions)

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any]) -> "RunOptions":
        """From the flat keywords of ``bncheck.diagnose(...)``: run fields and scoring fields."""
        run_names = {f.name for f in dataclasses.fields(cls)} - {"scoring"}
        scoring_names = {f.name for f in dataclasses.fields(ScoringOptions)}
        unknown = sorted(set(keywords) - run_names - scoring_names)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; options are "
                            f"{', '.join(sorted(run_names | scoring_names))}")
        scoring = ScoringOptions(**{k: v for k, v in keywords.items() if k in scoring_names})
        options = cls(scoring=scoring, **{k: v for k, v in keywords.items() if k in run_names})
        options.validate()
        return options

    def validate(self) -> None:
        check_integer("max_batches", self.max_batches, minimum=1)
        check_integer("max_samples", self.max_samples, minimum=2)
        check_integer("batch_size", self.batch_size)  # its range is the plan's to say (DataError)
        check_seed(self.seed)
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise InputError(f"amp must be one of {', '.join(AMP_DTYPES)} (or None), got {self.amp!r}")
        if not (isinstance(self.dist_timeout, (int, float)) and math.isfinite(self.dist_timeout)
                and self.dist_timeout > 0):
            raise InputError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}")


@dataclass(frozen=True)
class Run:
    adapter: ModelAdapter
    layers: tuple[NormLayer, ...]
    device: Any                       # torch.device
    plan: BatchPlan
    scoring: ScoringOptions
    world: World
    amp_dtype: Any = None             # torch.dtype under autocast, or None
    channels_last: bool = False

    @property
    def framework(self) -> str:
        return self.adapter.framework

    def layer(self, name: str) -> NormLayer:
        return next(layer for layer in self.layers if layer.name == name)


def resolve_run(model: Any, data: Any, options: RunOptions, *, world: World | None = None) -> Run:
    """Everything a pass needs, decided once; ``world`` defaults to the running process group.
    ``model`` is the user's model or an adapter already made for it."""
    from .devices import resolve_device

    adapter = model if isinstance(model, ModelAdapter) else adapter_for(model)
    layers = tuple(adapter.norm_layers())
    require_running_stats(adapter, layers)
    if world is None:
        world = current_world(options.dist_timeout) if options.distributed else World()
    device = resolve_device(options.device, local_rank=world.local_rank if world.size > 1 else None)
    amp = _amp_dtype(options.amp, adapter)
    plan = None
    if data is not None:
        plan = plan_batches(data, batch_size=options.batch_size, seed=options.seed, max_batches=options.max_batches,
                            max_samples=options.max_samples, pin_memory=device.type == "cuda")
        require_same_data(world, plan)
    return Run(adapter, layers, device, plan, options.scoring, world, amp, options.channels_last)


def require_same_data(world: World, plan: BatchPlan) -> None:
    """Every process shards one plan; processes given different data (each its own split, a
    DistributedSampler's shard) would be mixed into one wrong result."""
    if world.size < 2:
        return
    prints = world.exchange(plan.fingerprint())
    if any(p != prints[0] for p in prints):
        raise DataError(f"the {world.size} processes were given different data (batch size, batches, samples, "
                        "first sample: " + " vs ".join(map(str, dict.fromkeys(map(str, prints)))) +
                        "); give every process the whole data set, or pass distributed=False to diagnose "
                        "each process's own data alone")


def _amp_dtype(amp: str | None, adapter: ModelAdapter):
    if amp is None:
        return None
    if adapter.framework != "torch":
        raise InputError("--amp applies to PyTorch models; for Keras set a mixed-precision policy instead")
    import torch

    return torch.bfloat16 if amp == "bf16" else torch.float16


def require_running_stats(adapter: ModelAdapter, layers) -> None:
    uninitialized = getattr(adapter, "uninitialized_layers", lambda: [])()
    if uninitialized:
        raise InputError(f"lazy norm layer {uninitialized[0]} is not initialised yet; "
                         "run one forward pass or load a checkpoint before diagnosing")
    if not layers:
        raise NoNormLayersError("the model has no BatchNorm/InstanceNorm layers (or other modules with running "
                                "statistics): nothing for bncheck to check")
    if not any(layer.tracks_running_stats for layer in layers):
        raise NoNormLayersError(
            f"none of the model's {len(layers)} norm layers keeps running statistics "
            "(track_running_stats=False): eval mode already uses batch statistics, so there is nothing to compare")
