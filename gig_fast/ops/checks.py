"""Input checks shared by the ops. Every failure is a ``ValueError`` that names the argument and the problem."""
from __future__ import annotations

import torch

from .reference import accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf: a NaN in activations would silently poison every attribution downstream."""
    if not t.is_floating_point() or not t.numel():
        return
    # A sum is finite iff every entry is (barring overflow, which the full scan then rules on); it is
    # far cheaper than torch.isfinite over the whole tensor. Summed in the tensor's own dtype (fp32 for
    # fp16/bf16): a float64 sum of fp32 data is ~20x slower on the CPU (78 vs 3.7 ms for 50k x 256).
    acc = accumulation_dtype(t.dtype)
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_codes(idx: torch.Tensor, val: torch.Tensor, K: int, device: torch.device) -> None:
    """Padded sparse codes: ``idx [P, s]`` int64 with −1 padding, ``val [P, s]`` float, indices < K."""
    check_tensor("idx", idx, 2, (torch.int64,), device)
    check_tensor("val", val, 2, FLOAT_DTYPES, device)
    if idx.shape != val.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and val {tuple(val.shape)} must have the same shape [P, s]")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1:
            raise ValueError(f"idx holds {lo}; entries must be concept indices in [0, {K}) or -1 for padding")
        if hi >= K:
            raise ValueError(f"idx holds {hi} but V has only K={K} concepts (valid: 0..{K - 1}, -1 = padding)")


def flatten_leading(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """View ``[..., *trailing_dims]`` as ``[N, *trailing_dims]`` (the ops accept any leading batch shape)."""
    if t.dim() < trailing:
        raise ValueError(f"expected at least {trailing} dimensions, got shape {tuple(t.shape)}")
    lead = t.shape[: t.dim() - trailing]
    n = 1
    for d in lead:
        n *= d
    return t.reshape((n,) + tuple(t.shape[t.dim() - trailing:]))
