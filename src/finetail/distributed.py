"""Data-parallel training under ``torchrun``: the process group and rank helpers.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init`
reads them, picks the process's device (``cuda:LOCAL_RANK`` on CUDA, else the CPU) and joins
the process group (``nccl`` on CUDA, ``gloo`` on the CPU). Outside ``torchrun``, or with a
world of one, nothing is initialised and every helper answers for a single process, so the
engine calls them unconditionally.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "init",
    "is_main",
    "launched",
    "local_rank",
    "rank",
    "rank_slice",
    "steps_per_epoch",
    "teardown",
    "world_size",
]


def launched() -> bool:
    """True inside a process started by ``torchrun`` (its environment names a rank)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes training together (1 outside a process group)."""
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's rank on its node, from ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, results and tracking."""
    return rank() == 0


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Steps per epoch over ``n`` images in global batches of ``batch_size``; with ``world`` > 1
    a last partial batch smaller than the world (a rank would get no image) is dropped."""
    full, rest = divmod(n, batch_size)
    return max(1, full + (rest >= world if rest else 0))


def rank_slice(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of a global batch of ``n`` images (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


def init(device: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the ``torchrun`` process group (when ``WORLD_SIZE`` > 1) and return this rank's device.

    ``device`` is ``auto``, ``cpu`` or ``cuda[:i]``; under ``torchrun`` a CUDA device becomes
    ``cuda:LOCAL_RANK``. ``timeout_s`` bounds how long a collective waits for a missing rank
    (seconds).
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return torch.device(("cuda" if want_cuda else "cpu") if device == "auto" else device)
    if want_cuda:
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if want_cuda else None,
        )
    return dev


def teardown() -> None:
    """Leave the process group (a no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (``t`` must live on this rank's device); returns ``t``."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a SIGTERM seen by one)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
