"""Targeted adversarial attack for App. J (paper Fig. 12): projected gradient descent in L∞.

The paper attacks with Carlini & Wagner; PGD (Madry et al. 2018) is the standard L∞ alternative and
needs no inner optimiser. The steps are those of ``captum.robust.PGD`` with a cross-entropy loss and
``targeted=True`` (the tests check that both give the same image), plus a per-image stop once the
target class is predicted, so the perturbation is no larger than the attack needs.
"""
from __future__ import annotations

import torch

__all__ = ["targeted_pgd", "ZERO_GRADIENT"]

ZERO_GRADIENT = 1e-6  # gradient entries this small do not move a pixel (captum's FGSM threshold)


def targeted_pgd(model, x: torch.Tensor, target, *, eps: float, step_size: float, steps: int, lower=None, upper=None,
                 stop_at_target: bool = True) -> tuple[torch.Tensor, dict]:
    """Targeted L∞ PGD: move ``x`` towards being classified as ``target``.

    Each step: ``x ← x − step_size · sign(∇ CE(model(x), target))`` (entries with |∇| ≤
    :data:`ZERO_GRADIENT` stay), then clamp to ``[lower, upper]``, project onto the ε-ball around the
    input (``|x − x₀|∞ ≤ eps``) and clamp again.

    Args:
        model: classifier ``[B, C, H, W] → logits [B, n_classes]`` (used as is: put it in eval mode).
        x: ``[B, C, H, W]`` inputs (the model's normalised units).
        target: ``[B]`` (or one int) target classes.
        eps, step_size: L∞ radius and step, in the units of ``x``.
        steps: most steps.
        lower, upper: valid input range (scalars or tensors broadcastable to ``x``), or None.
        stop_at_target: freeze an image once it is classified as its target.

    Returns:
        ``(x_adv [B, C, H, W], info)`` with ``info``: ``success [B]`` (bool: predicted as target),
        ``steps [B]`` (steps taken), ``linf [B]`` (``|x_adv − x|∞``), ``logits [B, n_classes]``.
    """
    if eps < 0 or step_size <= 0 or steps < 0:
        raise ValueError(f"need eps ≥ 0, step_size > 0, steps ≥ 0; got {eps}, {step_size}, {steps}")
    x0 = x.detach()
    target = torch.as_tensor(target, dtype=torch.long, device=x.device).expand(x.shape[0])

    def bound(t):
        if lower is not None:
            t = torch.maximum(t, torch.as_tensor(lower, dtype=t.dtype, device=t.device))
        if upper is not None:
            t = torch.minimum(t, torch.as_tensor(upper, dtype=t.dtype, device=t.device))
        return t

    adv = x0.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    used = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(steps):
        if stop_at_target:
            with torch.no_grad():
                done |= model(adv).argmax(1) == target
            if bool(done.all()):
                break
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(model(adv), target, reduction="none")
            (grad,) = torch.autograd.grad(loss, adv, grad_outputs=torch.ones_like(loss))
        move = torch.where(grad.abs() > ZERO_GRADIENT, grad.sign(), torch.zeros((), dtype=grad.dtype))
        step = bound(adv.detach() - step_size * move)
        step = bound(x0 + torch.clamp(step - x0, -eps, eps))
        keep = done.view(-1, *([1] * (x.dim() - 1)))
        adv = torch.where(keep, adv.detach(), step)
        used += (~done).long().cpu()
    with torch.no_grad():
        logits = model(adv)
    info = {"success": (logits.argmax(1) == target).cpu(), "steps": used,
            "linf": (adv - x0).abs().flatten(1).amax(1).cpu(), "logits": logits.cpu()}
    return adv.detach(), info
