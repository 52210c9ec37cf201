"""Input checks shared by the ops. Every failure is a ``ValueError`` that names the argument and the problem."""
from __future__ import annotations

import math

import torch

from .common import accumulation_dtype

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


def _float_inputs(tensors: dict) -> list[tuple[str, torch.Tensor]]:
    return [(name, t) for name, t in tensors.items() if t is not None and t.is_floating_point() and t.numel()]


def _finite_sums(items: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    # A sum is finite iff every entry is (barring overflow, which the full scan then rules on); it is far
    # cheaper than torch.isfinite over the whole tensor. Each tensor is summed in its accumulation dtype
    # (fp32 for fp16/bf16/fp32): a float64 sum of fp32 data is ~20x slower on the CPU (78 vs 3.7 ms for
    # 50k x 256).
    return [t.sum(dtype=accumulation_dtype(t.dtype)).double() for _, t in items]


def _raise_nonfinite(items: list[tuple[str, torch.Tensor]]) -> None:
    for name, t in items:  # the slow path: which input, and how many entries
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{name} contains {bad} NaN or infinite value(s) (of {t.numel()})")


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Reject NaN/Inf in the float tensors given by name (None and integer tensors are skipped).

    The policy of every public op (see :mod:`gig_fast.ops`): each float input it reads is checked, all of
    them with ONE host synchronisation, so a GPU caller pays one round trip per call, not one per input.
    """
    items = _float_inputs(tensors)
    if items and not bool(torch.isfinite(torch.stack(_finite_sums(items))).all()):
        _raise_nonfinite(items)


def check_same_dtype(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_codes(idx: torch.Tensor, val: torch.Tensor, K: int, device: torch.device, *, index_range: bool = True,
                **finite: torch.Tensor | None) -> None:
    """Padded sparse codes: ``idx [P, s]`` int64 with −1 padding, ``val [P, s]`` float, indices < K.

    ``val`` and the float tensors in ``finite`` (by name) must hold no NaN/Inf; the index range and the
    finiteness are read back in one host synchronisation (see :func:`check_finite`). ``index_range=False``
    leaves the range to a kernel that checks it itself.
    """
    check_tensor("idx", idx, 2, (torch.int64,), device)
    check_tensor("val", val, 2, FLOAT_DTYPES, device)
    if idx.shape != val.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and val {tuple(val.shape)} must have the same shape [P, s]")
    items = _float_inputs({"val": val, **finite})
    extrema = [idx.min().double(), idx.max().double()] if idx.numel() and index_range else []  # exact: |idx| < 2^53
    stats = extrema + _finite_sums(items)
    if not stats:
        return
    host = torch.stack(stats).tolist()
    if extrema:
        lo, hi = int(host[0]), int(host[1])
        if lo < -1:
            raise ValueError(f"idx holds {lo}; entries must be concept indices in [0, {K}) or -1 for padding")
        if hi >= K:
            raise ValueError(f"idx holds {hi} but V has only K={K} concepts (valid: 0..{K - 1}, -1 = padding)")
    if not all(math.isfinite(x) for x in host[len(extrema):]):
        _raise_nonfinite(items)


def flatten_leading(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """View ``[..., *trailing_dims]`` as ``[N, *trailing_dims]`` (the ops accept any leading batch shape)."""
    if t.dim() < trailing:
        raise ValueError(f"expected at least {trailing} dimensions, got shape {tuple(t.shape)}")
    lead = t.shape[: t.dim() - trailing]
    n = 1
    for d in lead:
        n *= d
    return t.reshape((n,) + tuple(t.shape[t.dim() - trailing:]))
