"""Random padded sparse codes and the benchmark shapes of the ops that take them."""
from __future__ import annotations

import torch

__all__ = ["random_codes", "RECON_SHAPES"]

# ResNet-50 layer shapes for sparse reconstruction (64 images, K = 8·C concepts, s active per position).
RECON_SHAPES = {
    "layer1": dict(P=64 * 56 * 56, K=2048, C=256, s=30),
    "layer3": dict(P=64 * 196, K=8192, C=1024, s=30),
    "layer4": dict(P=64 * 49, K=16384, C=2048, s=30),
}

# Above this many concepts the distinct draw (a sort of a [rows, K] random matrix) costs too much memory;
# indices are then drawn with replacement (repeats are rare and every op accepts them).
_DISTINCT_MAX_K = 4096


def random_codes(rows: int | tuple[int, ...], s: int, K: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", pad_frac: float = 0.2, padding: str = "anywhere",
                 scale: float = 1.0, duplicates: bool = False, all_padding_rows: int = 0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded sparse codes ``(idx [*rows, s] int64, val [*rows, s])`` like those of ``sparse_code``.

    Args:
        rows: the leading shape: ``P`` or e.g. ``(B, P)`` (per-image codes of the GIG engine).
        s: entries per row; K: number of concepts (indices lie in ``[0, K)``).
        pad_frac: ``padding="anywhere"``: each entry is padding with this probability, at any place in
            its row (the op contract allows it; ``sparse_code`` itself pads at the end);
            ``"trailing"``: a random number of up to ``pad_frac·s`` entries at the end of each row.
        scale: standard deviation of the Gaussian coefficients.
        duplicates: allow a concept twice in a row (else distinct while ``K ≤ 4096`` and ``s ≤ K``).
        all_padding_rows: the first this many rows (of the flattened leading shape) are only padding.
        generator: the random generator (None: torch's global one).

    Padding is −1 in ``idx`` and exactly 0 in ``val``.
    """
    if padding not in ("anywhere", "trailing"):
        raise ValueError(f"padding must be 'anywhere' or 'trailing', got {padding!r}")
    shape = (rows,) if isinstance(rows, int) else tuple(rows)
    P = 1
    for d in shape:
        P *= d
    if duplicates or s > K or K > _DISTINCT_MAX_K:
        idx = torch.randint(0, K, (P, s), generator=generator)
    else:
        idx = torch.argsort(torch.rand(P, K, generator=generator), dim=1)[:, :s]
    val = scale * torch.randn(P, s, generator=generator, dtype=torch.float64)
    if padding == "anywhere":
        pad = torch.rand(P, s, generator=generator) < pad_frac
    else:
        n_active = s - (torch.rand(P, generator=generator) * pad_frac * s).long()
        pad = torch.arange(s)[None, :] >= n_active[:, None]
    pad[:all_padding_rows] = True
    idx = idx.masked_fill(pad, -1)
    val = val.masked_fill(pad, 0.0)
    return idx.reshape(shape + (s,)).to(device), val.reshape(shape + (s,)).to(device=device, dtype=dtype)
