"""β at a residual sum written with a scale, ``torch.add(a, b, alpha=s)`` or ``a.add(b, alpha=s)``: the
value there is ``a + s·b``, so β is ``shift(a) + s·shift(b)``. Checked against the model itself: with every
conv that feeds a BN silenced, the point's value is β at every position (test_slicing.py checks plain sums)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gig_fast.models.fx_adapter import FXAdapter
from gig_fast.slicing import bn_shift, preactivation
from gig_fast.testing import randomize_bn


class _ScaledSum(nn.Module):
    """Two conv→BN branches summed as ``a + alpha·b`` (function or method form), then a classifier."""

    def __init__(self, alpha: float, method: bool):
        super().__init__()
        self.alpha, self.method = alpha, method
        self.conv_a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a, b = self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))
        s = a.add(b, alpha=self.alpha) if self.method else torch.add(a, b, alpha=self.alpha)
        return self.head(torch.relu(s).mean((2, 3)))


@pytest.mark.parametrize("method", [False, True], ids=["torch.add", "Tensor.add"])
@pytest.mark.parametrize("alpha", [0.5, -2.0])
def test_beta_of_a_scaled_residual_sum_is_the_models_value_without_input(alpha, method, seed):
    model = randomize_bn(_ScaledSum(alpha, method), torch.Generator().manual_seed(seed)).double().eval()
    beta = bn_shift(model, "add")
    with torch.no_grad():  # no concept present: the convs contribute nothing, only the BN shifts remain
        for conv in (model.conv_a, model.conv_b):
            conv.weight.zero_()
            conv.bias.zero_()
    value = preactivation(model, "add", torch.randn(2, 3, 5, 5, dtype=torch.float64))
    torch.testing.assert_close(value, beta[None, :, None, None].expand_as(value), rtol=1e-12, atol=1e-12)
    # the adapter the pipeline uses gives the same β (its GIG baseline and concept-extraction centre)
    adapter = FXAdapter(model, points=["add"])
    torch.testing.assert_close(adapter.baseline("add", torch.zeros(4, 6, dtype=torch.float64)), beta)
