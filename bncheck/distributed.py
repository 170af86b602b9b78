"""Running one diagnosis across processes with torch.distributed (torchrun, or inside a DDP job).

Every rank builds the same seeded batch plan and takes a disjoint shard of it: batch ``i`` goes
to rank ``i mod W``. Every sample is counted exactly once (DistributedSampler pads its shards
with repeated samples, pytorch/pytorch#25162), batches stay whole, so train-mode BatchNorm sees
exactly the batches of a single-process run, and shards may be uneven.

Partial results (float64 moments, metric sums, counts) are exchanged once per pass, and once per
batch round with ``--quick``, over a gloo group on the CPU, and merged in rank order with Chan's
formula (SyncBatchNorm gathers ``[mean, invstd, count]`` for the same reason). A failure on any
rank travels with the next exchange, so every rank stops with the same one-line message; every
collective has a timeout, so a lost process never leaves the others hanging.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .errors import BncheckError, DistributedError, RankFailedError, summarize

DEFAULT_TIMEOUT_S = 1800.0
_SOURCE_LOCATION = re.compile(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")  # gloo's "[.../pair.cc:545] "


@dataclass(frozen=True)
class _Envelope:
    payload: Any = None
    error: str | None = None      # one-line message of a failure on the sending rank
    input_error: bool = True      # the failure was the user's input, not an internal error


@dataclass(frozen=True)
class World:
    """This process's place in the run: a single process unless a process group says otherwise."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None             # the gloo group bncheck exchanges over (None: the default group)
    _failed: list = field(default_factory=list, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def takes(self, index: int) -> bool:
        """Whether batch ``index`` of the plan is this rank's."""
        return index % self.size == self.rank

    def exchange(self, payload: Any) -> list[Any]:
        """Every rank's ``payload``, in rank order; raises when any rank reported a failure."""
        if self.size == 1:
            return [payload]
        envelopes = self._all_gather(_Envelope(payload))
        for rank, envelope in enumerate(envelopes):
            if envelope.error is not None:
                raise RankFailedError(f"rank {rank} failed: {envelope.error}")
        return [envelope.payload for envelope in envelopes]

    def _all_gather(self, envelope: _Envelope) -> list[_Envelope]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(gathered, envelope, group=self.group)
        except RuntimeError as error:  # a timeout, or a peer that went away
            reason = _SOURCE_LOCATION.sub("", summarize(error, 400))[:160]
            raise DistributedError(f"rank {self.rank}: lost contact with the other processes ({reason}); "
                                   "one of them may have stopped") from error
        return gathered

    @contextlib.contextmanager
    def failing_together(self):
        """On a failure here, tell the other ranks at their next exchange before raising it."""
        try:
            yield
        except (RankFailedError, DistributedError):
            raise
        except Exception as error:
            if self.size > 1 and not self._failed:
                self._failed.append(error)
                message = summarize(error) if isinstance(error, BncheckError) else \
                    f"internal error: {type(error).__name__}: {summarize(error)}"
                with contextlib.suppress(BncheckError):
                    self._all_gather(_Envelope(error=message, input_error=isinstance(error, BncheckError)))
            raise


def current_world(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """The running process group as a World, or a single process when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # a torch build without distributed support
        return World()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return World()
    group = None
    if dist.get_backend() != "gloo":  # bncheck exchanges CPU tensors and objects
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, group)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(use_cuda: bool, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    nccl when the passes run on CUDA, gloo otherwise. Returns whether this call created it."""
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"cannot join the torchrun process group: {summarize(error, 200)}") from error
    return True


def shutdown(created: bool) -> None:
    if created:
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            dist.destroy_process_group()
