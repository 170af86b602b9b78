"""Turning the user's data into batches: seeded reshuffling, subsets, batch checks.

Train-mode results depend on which samples share a batch, so when the data is a
map-style dataset (or a DataLoader over one) bncheck draws its own batches with a
seeded shuffle at the loader's batch size. An iterable of ready-made batches is
used as given, and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from .arguments import check_batching
from .errors import DataError

DEFAULT_BATCH_SIZE = 32
_INPUT_KEYS = ("inputs", "input", "x", "images", "image", "pixel_values", "data")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")


@dataclass(frozen=True)
class BatchPlan:
    """Where batches come from. Unless the user's data is a one-shot iterator (``reiterable`` False),
    each iteration of ``batches`` yields the same batches."""

    batches: Iterable
    batch_size: int | None
    reshuffled: bool
    num_batches: int | None
    seed: int
    reiterable: bool = True

    def require_reiterable(self, why: str) -> None:
        if not self.reiterable:
            raise DataError(f"{why} goes over the data more than once: pass a DataLoader, a Dataset or a list "
                            "of batches, not a one-shot generator")

    def shard(self, rank: int = 0, size: int = 1, *, limit: int | None = None):
        """``(index, batch)`` for the batches ``index % size == rank`` of the plan (its first ``limit``)."""
        shard = getattr(self.batches, "shard", None)
        if shard is not None:
            yield from shard(rank, size, limit)
            return
        for index, batch in enumerate(self.batches):
            if limit is not None and index >= limit:
                return
            if index % size == rank:
                yield index, batch

    def fingerprint(self) -> tuple:
        """What every process of a distributed run must agree on to share one data set: the plan's
        shape and, for a dataset, the sum of its first sample."""
        describe = getattr(self.batches, "fingerprint", None)
        if describe is not None:
            return (self.batch_size, self.num_batches) + describe()
        length = len(self.batches.data) if hasattr(getattr(self.batches, "data", None), "__len__") else None
        return (self.batch_size, self.num_batches, length)

    def shard_length(self, rank: int = 0, size: int = 1, limit: int | None = None) -> int | None:
        total = self.num_batches if limit is None or self.num_batches is None else min(limit, self.num_batches)
        return None if total is None else len(range(rank, total, size))


def is_map_style(data: Any) -> bool:
    return (
        not isinstance(data, IterableDataset)
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (torch.Tensor, tuple, list, dict))
    )


def as_dataset(data: Any) -> Any:
    """Accept a tensor pair or a bare tensor as a dataset."""
    if isinstance(data, list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        raise DataError("data is a list of two tensors, which reads as (inputs, targets) or as two batches of "
                        "inputs: pass a tuple (inputs, targets) or a TensorDataset for labelled data, or a list "
                        "of 1-tuples [(batch,), (batch,)] for two unlabelled batches")
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, targets = data
        if len(inputs) != len(targets):
            raise DataError(f"inputs hold {len(inputs)} samples but targets hold {len(targets)}")
        return TensorDataset(inputs, targets)
    if isinstance(data, torch.Tensor):
        return UnlabelledDataset(data)
    return data


class UnlabelledDataset(Dataset):
    """Inputs without targets: item ``i`` is the input tensor itself."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.inputs[index]


def plan_batches(
    data: Any,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    max_samples: int | None = None,
    pin_memory: bool = False,
) -> BatchPlan:
    """Decide the batches a diagnosis runs on; ``pin_memory`` for copies to a CUDA device."""
    check_batching(batch_size=batch_size, seed=seed, max_batches=max_batches, max_samples=max_samples)
    if batch_size is not None and batch_size < 2:
        raise DataError("batch size must be at least 2: train-mode BatchNorm needs 2+ samples per batch")
    if data is None:
        raise DataError("no data: define get_dataloader() or dataset in model.py, or pass --data")
    data = as_dataset(data)
    loader = data if isinstance(data, DataLoader) else None
    dataset = loader.dataset if loader is not None else data
    if is_map_style(dataset) and (loader is None or (loader.batch_size is not None and _default_sampler(loader))):
        return _reshuffled_plan(dataset, loader, batch_size, seed, max_batches, max_samples, pin_memory)
    if not hasattr(data, "__iter__"):
        raise DataError(f"data of type {type(data).__name__} is not iterable; return a DataLoader or a Dataset")
    if max_samples is not None:
        raise DataError("--max-samples needs a map-style dataset; use --max-batches for an iterable of batches")
    if batch_size is not None:
        raise DataError("--batch-size needs a map-style dataset; this data yields ready-made batches")
    one_shot = hasattr(data, "__next__")  # an iterator (a generator) is used up by one pass
    return BatchPlan(_GivenBatches(data, max_batches), None, False, None, seed, reiterable=not one_shot)


def _default_sampler(loader: DataLoader) -> bool:
    """A custom sampler picks which samples count (a split, weights): keep the loader's batches then.
    A DistributedSampler only shards the dataset (with padding): bncheck shards it exactly itself."""
    from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

    return type(loader.sampler) in (RandomSampler, SequentialSampler, DistributedSampler)


def _reshuffled_plan(dataset, loader, batch_size, seed, max_batches, max_samples, pin_memory) -> BatchPlan:
    size = len(dataset)
    if size == 0:
        raise DataError("the dataset is empty")
    if batch_size is None:
        batch_size = loader.batch_size if loader is not None else DEFAULT_BATCH_SIZE
    if batch_size < 2:
        raise DataError(
            "the data loader's batch size is 1: train-mode BatchNorm needs 2+ samples per batch; pass --batch-size"
        )
    generator = torch.Generator().manual_seed(seed)
    if max_samples is not None and max_samples < size:
        if max_samples < 2:
            raise DataError("--max-samples must be at least 2")
        # Uniform subset, drawn from a seed derived from (not equal to) the shuffle's.
        indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1))[:max_samples]
        dataset = Subset(dataset, indices.tolist())
        size = max_samples
    if size < 2:
        raise DataError("the dataset holds a single sample: train-mode BatchNorm needs 2+ samples per batch")
    num_batches = -(-size // batch_size)
    if num_batches > 1 and size - (num_batches - 1) * batch_size == 1:
        num_batches -= 1  # a lone trailing sample cannot be batch-normalised
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    kwargs = {"pin_memory": pin_memory}
    if loader is not None:
        kwargs = dict(collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory or pin_memory)
    batches = _SeededBatches(dataset, batch_size, seed, num_batches, kwargs)
    return BatchPlan(batches, batch_size, True, num_batches, seed)


class _SeededBatches:
    """The same seeded shuffle every time it is iterated; a lone trailing sample is dropped."""

    def __init__(self, dataset, batch_size, seed, num_batches, loader_kwargs):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_batches, self.loader_kwargs = num_batches, loader_kwargs

    def __len__(self) -> int:
        return self.num_batches

    def _chunks(self) -> list[list[int]]:
        size = len(self.dataset)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        chunks = [order[i:i + self.batch_size] for i in range(0, size, self.batch_size)][: self.num_batches]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks = chunks[:-1]
        return chunks

    def __iter__(self):
        return (batch for _index, batch in self.shard())

    def fingerprint(self) -> tuple:
        return (len(self.dataset), _first_sample_sum(self.dataset))

    def shard(self, rank: int = 0, size: int = 1, limit: int | None = None):
        """Only this rank's batches are loaded."""
        chunks = self._chunks()[:limit]
        mine = list(range(rank, len(chunks), size))
        if not mine:
            return
        direct = _direct_batches(self.dataset, self.loader_kwargs)
        if direct is not None:
            yield from ((i, direct(chunks[i])) for i in mine)
            return
        loader = DataLoader(self.dataset, batch_sampler=[chunks[i] for i in mine], **self.loader_kwargs)
        yield from zip(mine, loader)


def _first_sample_sum(dataset) -> float | None:
    """The sum of sample 0, read twice: None where loading it is random (augmentation) or fails
    (the pass reports that)."""
    try:
        with torch.random.fork_rng(devices=[]):  # an augmentation's draws must not move the caller's stream
            sums = [sum(float(t.double().sum()) for t in iter_tensors(dataset[0]) if t.is_floating_point())
                    for _ in range(2)]
    except Exception:
        return None
    return sums[0] if sums[0] == sums[1] else None


def _direct_batches(dataset, loader_kwargs: dict):
    """In-memory tensors batch by indexing (what the default collate would stack, sample by sample)."""
    from torch.utils.data import default_collate

    if loader_kwargs.get("num_workers", 0) or loader_kwargs.get("collate_fn", default_collate) is not default_collate:
        return None
    base = None
    if isinstance(dataset, Subset):
        dataset, base = dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(dataset, TensorDataset):
        tensors, bare = dataset.tensors, False
    elif isinstance(dataset, UnlabelledDataset) and isinstance(dataset.inputs, torch.Tensor):
        tensors, bare = (dataset.inputs,), True
    else:
        return None
    pin = loader_kwargs.get("pin_memory", False)

    def batch(chunk: list[int]):
        index = torch.as_tensor(chunk) if base is None else base[chunk]
        parts = [t[index].pin_memory() if pin else t[index] for t in tensors]
        return parts[0] if bare else parts

    return batch


class _GivenBatches:
    def __init__(self, data, max_batches):
        self.data, self.max_batches = data, max_batches

    def __iter__(self):
        for index, batch in enumerate(self.data):
            if self.max_batches is not None and index >= self.max_batches:
                return
            yield batch


def split_batch(batch: Any, *, input_key: str | None = None, target_key: str | None = None) -> tuple[Any, Any]:
    """Split one batch into ``(inputs, targets)``; targets are None for unlabelled data."""
    if isinstance(batch, dict):
        in_key = input_key or next((k for k in _INPUT_KEYS if k in batch), None)
        if in_key is None or in_key not in batch:
            raise DataError(f"batch is a dict with keys {sorted(batch)[:8]}; pass --input-key")
        tgt_key = target_key or next((k for k in _TARGET_KEYS if k in batch), None)
        if target_key is not None and target_key not in batch:
            raise DataError(f"batch has no key {target_key!r}; keys are {sorted(batch)[:8]}")
        return batch[in_key], (batch[tgt_key] if tgt_key else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise DataError(
            f"batch has {len(batch)} items; yield (inputs, targets), with inputs a tuple for multi-input models"
        )
    raise DataError(f"batch of type {type(batch).__name__}; yield (inputs, targets) tuples or tensors")


def batch_length(inputs: Any) -> int:
    """Number of samples in a batch's inputs (the first tensor found)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 0
    if isinstance(inputs, dict):
        return batch_length(next(iter(inputs.values()), None))
    if isinstance(inputs, (tuple, list)) and inputs:
        return batch_length(inputs[0])
    if hasattr(inputs, "shape") and len(inputs.shape):
        return int(inputs.shape[0])
    raise DataError(f"cannot find a tensor in batch inputs of type {type(inputs).__name__}")


def iter_tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item)
