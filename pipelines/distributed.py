"""Data parallelism as the stages see it: this process's rank in the process group (1 of 1 without one), the
sums that every rank must agree on, and rows gathered from every rank.

The process group is made by whoever starts the ranks (Ray Train's TorchTrainer, torchrun, or a test); stages
only ask for it here, so the same code runs as one process or as one of N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, global_batch: int, what: str = "batch") -> int:
        """This rank's part of a global batch; a batch the ranks cannot split evenly is a config error."""
        if global_batch % self.world_size:
            raise ValueError(f"{what} {global_batch} does not divide among {self.world_size} workers; use a "
                             f"multiple of {self.world_size}")
        return global_batch // self.world_size


def ranks() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (nothing to do for one process)."""
    if ranks().world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any (one all-reduce in a process group; `flag` alone without)."""
    if ranks().world_size == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers of rows)."""
    if ranks().world_size == 1:
        return rows
    parts: list = [None] * ranks().world_size
    dist.all_gather_object(parts, rows)
    return np.concatenate([p for p in parts if len(p)] or parts[:1])  # a rank with no rows adds none


def gather_to_main(rows: np.ndarray) -> np.ndarray | None:
    """Every rank's rows, concatenated in rank order, on the main rank only (None elsewhere): what is solved once
    needs its inputs in one place, not a copy on every rank."""
    if ranks().world_size == 1:
        return rows
    parts: list | None = [None] * ranks().world_size if ranks().main else None
    dist.gather_object(rows, parts, dst=0)
    return np.concatenate([p for p in parts if len(p)] or parts[:1]) if parts is not None else None


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` run on the main rank only, its (picklable) result handed to every rank."""
    if ranks().world_size == 1:
        return compute()
    box = [compute() if ranks().main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def part(n: int) -> slice:
    """This rank's contiguous part of n items (sizes within one): concatenated in rank order, the parts are the
    items in their order, so a result gathered from N ranks equals that of one process."""
    where = ranks()
    return slice(where.rank * n // where.world_size, (where.rank + 1) * n // where.world_size)


def barrier() -> None:
    if ranks().world_size > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module that runs the training step: `model` itself on one process, DDP around it on more (whose
    gradient all-reduce averages over ranks, so each rank's loss is the mean over its part of the batch)."""
    if ranks().world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
