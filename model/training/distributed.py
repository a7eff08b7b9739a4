"""Training in several processes (``torchrun``): who this process is, and the few collective steps
the trainer needs.

``torchrun`` starts one process (a *rank*) per device and tells each its place in the environment:
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``).
:func:`ranks_from_environment` reads them into a :class:`Ranks`. Without them (or with
``WORLD_SIZE`` 1) training runs in this one process as it always has, and every method here is a
no-op.

With several ranks, under :func:`process_group`:

* every rank reads the same corpus, fits the same tokenizer, builds the same model, loads the same
  checkpoint to resume from, and draws the same order of windows from the same seed, so each
  step's global batch (``--batch_size`` windows) is the same everywhere; each rank trains on its
  own slice of it (:meth:`Ranks.shard`) in ``DistributedDataParallel`` (:meth:`Ranks.wrap`);
  ranks that resumed from different checkpoints stop with an error (:meth:`Ranks.same`);
* the loss is the mean over the global batch's tokens: the token counts are all-reduced
  (:meth:`Ranks.sum`) and each rank divides its loss sums by them, so the gradient equals that of
  one process holding the whole batch;
* validation is sharded: each rank scores its share of the validation batches and the sums are
  all-reduced, so every rank has the same figure;
* rank 0 alone writes checkpoints, the log and the run statistics, and shows progress bars; the
  others log errors only;
* Ctrl-C or SIGTERM only marks a stop (:func:`install_stop_handlers`); at the next step every rank
  learns of it (:meth:`Ranks.agree`) and stops at the same step, rank 0 saves ``latest``, and all
  wait for that save (:meth:`Ranks.barrier`) before leaving.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from model.runtime.device import resolve_device

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # Set by a SIGINT/SIGTERM under torchrun; :meth:`agree` turns it into a stop on every rank.
    stop_requested: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @classmethod
    def one_process(cls, device: torch.device) -> Ranks:
        """Training without torchrun: rank 0 of 1."""
        return cls(rank=0, world_size=1, local_rank=0, device=device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and talks to the terminal."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of ``items``; the slices are disjoint, cover ``items`` in
        order, and differ in length by at most one (the first ones are the longer). A rank past
        the end of a short list gets an empty slice."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start:start + size + (self.rank < extra)])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place, and returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_floats(self, *values: float) -> list[float]:
        """Python numbers summed over the ranks (in float64)."""
        if not self.distributed:
            return list(values)
        return self.sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def same(self, *values: int) -> bool:
        """Whether every rank holds the same integers ``values`` (all ranks get the same answer)."""
        if not self.distributed:
            return True
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    def agree(self, elapsed: float) -> float:
        """Rank 0's ``elapsed`` seconds, on every rank (so that clock-driven decisions, the
        learning rate under ``--max_minutes`` and the time limit, are the same everywhere); raises
        KeyboardInterrupt on every rank once any rank has been asked to stop."""
        if not self.distributed:
            return elapsed
        stop, shared = self.sum_floats(float(self.stop_requested.is_set()),
                                       elapsed if self.is_main else 0.0)
        if stop:
            raise KeyboardInterrupt
        return shared

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel (rank 0's weights copied to every rank, then
        gradients averaged over the ranks in each backward), or ``module`` itself in one process."""
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            dist.barrier()


def ranks_from_environment(device: str, environ: Mapping[str, str] | None = None) -> Ranks:
    """The :class:`Ranks` torchrun's environment describes, on ``device`` (``auto``, ``cpu`` or
    ``cuda``): with several ranks on CUDA, rank ``LOCAL_RANK``'s GPU ``cuda:LOCAL_RANK``. Without
    torchrun: rank 0 of 1 on :func:`model.runtime.device.resolve_device`'s device."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world <= 1:
        return Ranks.one_process(resolved)
    rank, local = int(env["RANK"]), int(env["LOCAL_RANK"])
    if resolved.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                             f"devices here: start at most that many processes per machine")
        resolved = torch.device("cuda", local)
    return Ranks(rank=rank, world_size=world, local_rank=local, device=resolved)


@contextmanager
def process_group(ranks: Ranks) -> Iterator[Ranks]:
    """Join the other ranks (NCCL on CUDA, gloo on CPU) for the block, and leave at its end; no-op
    in one process."""
    if not ranks.distributed:
        yield ranks
        return
    if ranks.device.type == "cuda":
        torch.cuda.set_device(ranks.device)
        dist.init_process_group("nccl", device_id=ranks.device)
    else:
        dist.init_process_group("gloo")
    logger.info("rank %d of %d on %s", ranks.rank, ranks.world_size, ranks.device)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()


def install_stop_handlers(ranks: Ranks) -> None:
    """Make Ctrl-C and SIGTERM stop training (which then saves ``latest``).

    In one process the signal raises KeyboardInterrupt at once (SIGINT explicitly too: a trainer
    started as a background job of a non-interactive shell inherits SIGINT ignored). Under
    torchrun, which passes its signal on to every rank, it only marks the stop, which
    :meth:`Ranks.agree` turns into KeyboardInterrupt on every rank at the same step: a rank
    interrupted on its own, in the middle of a collective, would leave the others waiting.
    """
    def mark_stop(signum: int, frame) -> None:
        ranks.stop_requested.set()

    handler = mark_stop if ranks.distributed else signal.default_int_handler
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
