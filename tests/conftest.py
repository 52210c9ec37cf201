"""Test set-up: Triton kernels run under its interpreter when there is no GPU (set before any import)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every check, but reproducible from the test id when one fails."""
    seed = abs(hash(request.node.nodeid)) % (2**31) + int.from_bytes(os.urandom(2), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
