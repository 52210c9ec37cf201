"""The Python-side backends of gig_fast's ops: Triton kernels, one op per file, and ``two_means_batched``
(the 2-means splits of a round as one tensor program, the GPU route of the concept extractor). The C++
and CUDA backends are in ``csrc/<op>/``; the pure-PyTorch reference is :mod:`gig_fast.ops.reference`.

Each Triton file reads top to bottom: kernel(s) → launcher → the functions the op layer calls. The op layer
(`gig_fast.ops`) validates inputs and handles autograd; these launchers assume contiguous, checked
tensors. On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (tests only).
"""
