"""The images of stages 1 and 3, loaded ahead of the compute (to keep the device busy).

A stage asks for all the batches it will compute, in order, once (:func:`image_batches`); they arrive
as ``(x [B, C, H, W] float32 on the device, y [B])``, the same values as ``pipe.load_images(batch)``.
Two ways, chosen by ``loader_workers`` (config; None = automatic):

* ``0``: ``pipe.load_images`` on one background thread, two batches ahead. In-memory data sets
  (``TensorDataset``, the offline photos) only index a tensor, which a thread overlaps with the device's
  work (indexing and copying release the GIL);
* ``N > 0``: a ``torch.utils.data.DataLoader`` with N worker processes that decode the images (an
  image folder: JPEG decoding and resizing, ~3 ms per ImageNet-sized image on one core, measured in
  docs/scale.md — one core cannot feed a GPU), pinned host memory on CUDA and non-blocking copies.

Automatic: workers for an :class:`~gig_fast.data.ImageFolderDataset` (one per free core, at most 8,
shared by the ranks of one node), 0 otherwise.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from ..data import ImageFolderDataset
from . import distributed as dist

__all__ = ["image_batches", "loader_workers"]

PREFETCH = 2  # batches loaded ahead of the one being computed (bounds the extra host memory)


def loader_workers(pipe) -> int:
    """The number of decoding processes: ``config.loader_workers``, or automatic (see the module)."""
    n = pipe.config.loader_workers
    if n is not None:
        return int(n)
    if not isinstance(pipe.dataset, ImageFolderDataset):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, dist.world()) - 1))


def image_batches(pipe, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` of each of ``batches`` (arrays of dataset indices), in order, loaded ahead."""
    if not batches:
        return iter(())
    workers = loader_workers(pipe)
    if workers == 0:
        return _threaded(pipe, batches)
    return _worker_processes(pipe, batches, workers)


def _threaded(pipe, batches):
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gig-load") as pool:
        pending = [pool.submit(pipe.load_images, b) for b in batches[:PREFETCH]]
        for i in range(len(batches)):
            x, y = pending.pop(0).result()
            if i + PREFETCH < len(batches):
                pending.append(pool.submit(pipe.load_images, batches[i + PREFETCH]))
            yield x, y


def _collate(items):
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


def _worker_processes(pipe, batches, workers: int):
    cuda = pipe.device.type == "cuda"
    loader = torch.utils.data.DataLoader(pipe.dataset, batch_sampler=[[int(i) for i in b] for b in batches],
                                         num_workers=workers, collate_fn=_collate, pin_memory=cuda,
                                         prefetch_factor=PREFETCH)
    for x, y in loader:
        yield x.to(pipe.device, torch.float32, non_blocking=cuda), y.to(pipe.device, non_blocking=cuda)
