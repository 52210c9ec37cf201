"""The machine's memory-copy bandwidth, measured in the same run as the ops: the bound that
``harness.derive`` divides each op's bytes by for "% of the bound" (on a GPU without such a row the
peak bandwidth of ``harness.PEAKS`` stands in). Moved bytes = read + write of the copied tensor.
"""
from __future__ import annotations

import torch

MIB = {"smoke": 8, "quick": 256, "full": 1024}  # 1 GiB on a GPU: far past its L2


def bench_memory_copy(bench, device, gig_size):
    mib = MIB[gig_size] if device.startswith("cuda") else min(MIB[gig_size], 256)
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)

    def check(_):
        assert torch.equal(dst, src), "the copy differs from its source"
        return {}

    bench(lambda: dst.copy_(src), op="memory copy", impl="Tensor.copy_", role="ceiling", case=f"{mib} MiB",
          shape={"MiB": mib}, check=check, bytes_moved=2 * src.numel() * 4)
