"""Input builders shared by the tests and the benchmarks (one source of truth for shapes and data)."""
from __future__ import annotations

import torch

__all__ = ["random_codes", "RECON_SHAPES"]

# ResNet-50 layer shapes for sparse reconstruction (64 images, K = 8·C concepts, s active per position).
RECON_SHAPES = {
    "layer1": dict(P=64 * 56 * 56, K=2048, C=256, s=30),
    "layer3": dict(P=64 * 196, K=8192, C=1024, s=30),
    "layer4": dict(P=64 * 49, K=16384, C=2048, s=30),
}


def random_codes(P: int, s: int, K: int, *, dtype=torch.float32, device="cpu", pad_frac: float = 0.2,
                 duplicates: bool = False, all_padding_rows: int = 0, generator=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded sparse codes ``(idx [P, s] int64, val [P, s])`` like those of ``sparse_code``.

    Each row gets distinct concepts (or repeats when ``duplicates``), a random share ``pad_frac`` of
    trailing entries becomes padding (−1 with value 0), and the first ``all_padding_rows`` rows are
    entirely padding.
    """
    if duplicates or s > K:
        idx = torch.randint(0, K, (P, s), generator=generator)
    else:
        idx = torch.argsort(torch.rand(P, K, generator=generator), dim=1)[:, :s] if K <= 4096 else \
            torch.randint(0, K, (P, s), generator=generator)
    val = torch.randn(P, s, generator=generator)
    n_active = s - (torch.rand(P, generator=generator) * pad_frac * s).long()
    pad = torch.arange(s)[None, :] >= n_active[:, None]
    pad[:all_padding_rows] = True
    idx = idx.masked_fill(pad, -1)
    val = val.masked_fill(pad, 0.0)
    return idx.to(device), val.to(device=device, dtype=dtype)
