"""Triton kernels of gig_fast, one op per file (importable as ``gig_fast.kernels``).

Each file reads top to bottom: kernel(s) → launcher → the functions the op layer calls. The op layer
(`gig_fast.ops`) validates inputs and handles autograd; these launchers assume contiguous, checked
tensors. On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (tests only).
"""
