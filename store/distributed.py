"""Running under torchrun: process-group setup and the few collective operations the loops need.

    torchrun --nproc-per-node 2 cli.py train data/work --run-dir runs/ddp   # gloo on CPU, nccl on CUDA
    torchrun --nproc-per-node 2 cli.py featurize data/work

Without torchrun (no WORLD_SIZE in the environment, or 1) every helper here is a no-op, so the
single-process path stays exactly what it was. Only rank 0 writes checkpoints, logs and plots.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = Dist()  # the plain, single-process case


def init_distributed() -> Dist:
    """Join the process group torchrun describes in the environment (once); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group() -> Iterator[Dist]:
    """`init_distributed` for the length of one command, then leave the group on a normal exit.

    Leaving matters: a process that exits inside the group lets gloo's worker thread drop the last
    collective's tensor while Python shuts down, and taking the GIL then aborts the process
    ("terminate called without an active exception"). A script that exits right after a
    collective aborted in 9 of 30 torchrun runs without leaving and in 0 of 60 with it. After an
    error the group is left alone: other ranks may wait in a collective, and destroying it could
    hang them instead of letting torchrun stop them.
    """
    ctx = init_distributed()
    yield ctx
    if ctx.active:
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def broadcast_object(ctx: Dist, obj):
    """Rank 0's value of `obj` on every rank (a run directory, a decision)."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(ctx: Dist, obj) -> list:
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def sum_scalar(ctx: Dist, value: float) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def max_scalar(ctx: Dist, value: int) -> int:
    if not ctx.active:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def shard(indices, ctx: Dist):
    """This rank's share of one global batch: every world_size-th item. A final batch smaller than
    the world gives each rank one item (some twice), so that no rank is left without work."""
    if not ctx.active:
        return indices
    if len(indices) >= ctx.world_size:
        return indices[ctx.rank :: ctx.world_size]
    return indices[ctx.rank % len(indices) : ctx.rank % len(indices) + 1]
