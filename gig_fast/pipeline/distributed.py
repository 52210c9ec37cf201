"""Multi-process runs under ``torchrun`` (docs/design.md §6): rank/world, barriers and all-reduces.

``torchrun --nproc_per_node=N -m gig_fast.cli run ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` then joins the process group (NCCL when the run's
device is CUDA, gloo on the CPU). Without those variables (``WORLD_SIZE`` unset or 1) every helper
here is a no-op, so a single process needs no launcher and runs exactly as before.

How the pipeline uses it: stage-1/3/4 chunk ``ci`` belongs to rank ``ci % world`` (each rank writes
its own chunk files, every file atomically) and all ranks meet at a barrier after each stage (and
after each GIG layer transition, whose targets depend on all chunks of the level above); stage 2
runs the bisecting k-means together (:func:`bisecting_kmeans`); rank 0 alone writes the
shared artifacts (concept files, ``graph.json``, ``metrics.json``, ``report.html``).
"""
from __future__ import annotations

import atexit
import datetime
import os

import torch

from ..concepts import bisecting_spherical_kmeans, distributed_bisecting_kmeans

__all__ = ["setup", "env_world", "rank", "world", "is_main", "barrier", "all_reduce", "owns", "bisecting_kmeans"]


def env_world() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): the launcher's number of processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (once per process; a
    group the caller initialised itself is used as it is).

    Args:
        device: the run's device; ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run.

    Returns:
        ``(rank, world, device)``; ``(0, 1, device)`` in a single process.
    """
    d = _dist()
    if d is not None:  # the caller already joined a group (its own launcher): use it
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return d.get_rank(), d.get_world_size(), device
    n = env_world()
    if n <= 1:
        return 0, 1, device
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={n} but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={n} but {missing} are not set: launch with torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a long timeout: a rank waits at a barrier while the others finish a whole stage
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(hours=6))
    atexit.register(_shutdown)
    if dist.get_world_size() != n:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={n}")
    return dist.get_rank(), n, device


def _shutdown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def world() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def is_main() -> bool:
    """True on rank 0 (the writer of shared artifacts) and in a single process."""
    return rank() == 0


def owns(index: int) -> bool:
    """Whether this rank computes work item ``index`` (round-robin: ``index % world == rank``)."""
    return index % world() == rank()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    d = _dist()
    if d is not None:
        if d.get_backend() == "nccl":
            d.barrier(device_ids=[torch.cuda.current_device()])
        else:
            d.barrier()


def _comm_device(t: torch.device) -> torch.device:
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: ``t`` reduced over all ranks (``op`` = ``sum`` | ``max`` | ``min``); ``t`` itself
    in a single process. The tensor travels on the backend's device (CUDA for NCCL, else CPU)."""
    d = _dist()
    if d is None:
        return t
    ops = {"sum": d.ReduceOp.SUM, "max": d.ReduceOp.MAX, "min": d.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    buf = t.detach().to(_comm_device(t.device), copy=True).contiguous()
    d.all_reduce(buf, op=ops[op])
    return buf.to(t.device)


def bisecting_kmeans(X: torch.Tensor, K: int, beta: torch.Tensor, seed: int, mode: str | None):
    """The concepts of one layer, ``(V [K, C], labels [N])``: :func:`~gig_fast.concepts.bisecting_spherical_kmeans`
    in one process; under ``torchrun`` its collective twin
    :func:`~gig_fast.concepts.distributed_bisecting_kmeans`, which every rank calls with the same ``X``
    and which returns the same concepts. ``mode`` None: the extractor's default."""
    kw = {"beta": beta, "seed": seed}
    if mode is not None:
        kw["mode"] = mode
    if world() > 1:
        return distributed_bisecting_kmeans(X, K, rank=rank(), world=world(), all_reduce=all_reduce, **kw)
    return bisecting_spherical_kmeans(X, K, **kw)
