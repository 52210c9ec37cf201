"""Sharing Ratio Decomposition (SRD, Han et al. 2024) for ResNets, batched, under ``no_grad``.

Used by stage 1 (docs/design.md §1.2, paper App. C, Eq. 10) to score every position of every analysed
layer by its contribution to a class logit, and to label one sampled PFV per layer with its iERF
(the input-pixel relevance of that PFV). See ``paper/srd-notes.md`` for the rules; in short:

* a conv+BN step from post-activation PFVs ``x_i`` to pre-activation PFVs ``v_j``: the contribution
  through one kernel tap is ``u_{i→j} = scale ⊙ (W_tap x_i)``; the BN shift is shared among the taps
  of ``j`` in proportion to ``‖u_{i→j}‖``; the sharing ratio is ``μ_{i→j} = ⟨v̂_{i→j}, v_j⟩ / ‖v_j‖²``
  and relevance flows down as ``R_i = Σ_j μ_{i→j} R_j`` (ratios of one ``j`` sum to 1: conserved);
* ReLU passes relevance unchanged; a residual sum ``v = r + s`` splits by ``⟨r, v⟩`` and ``⟨s, v⟩``
  (the main branch's last conv taps carry ``r`` with its BN shift, the identity skip carries ``s``);
* global average pool + linear: position ``i`` gets ``(w_c·x_i + b_c)/n`` of the logit ``z_c``.

Because μ depends only on the activations and not on the relevance, one downward pass carries
several relevance maps at once (a stack axis ``S``): the class contribution, and one one-hot map
per analysed layer added when the pass reaches that layer — so every layer's contribution map and
every sampled PFV's iERF come out of a single pass. μ is never materialised beyond one tap at a time.

Deviation from the authors' code, documented: a max-pool is its own step (each output PFV shares
its relevance among the window positions by the energy ``Σ_c v_c²`` of the channels each position
won), rather than being fused with the following conv.

Gradient × input (:func:`gradxinput_explain`) is the fast alternative with the same outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models.adapters import ForwardRecord, ResNetAdapter
from .models.bn import bn_affine, branch_modules

__all__ = ["SRDResult", "srd_explain", "gradxinput_explain", "explain", "conv_step_ratios", "propagate"]

Selector = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@dataclass
class SRDResult:
    """Outputs of one explanation pass over a batch of B images.

    Attributes:
        logits: ``[B, n_classes]``.
        target: ``[B]`` class explained per image.
        contributions: point → ``[B, H, W]`` signed contribution of each position to the target logit
            (sums to the logit up to the ε guards, for SRD); ``"input"`` → ``[B, H_in, W_in]``.
        positions: point → ``[B]`` flat position (``h·W + w``) whose iERF was taken.
        ierf: point → ``[B, H_in, W_in]`` signed iERF of that PFV (sums to 1 for SRD).
        record: the forward record (pre-activations of every point).
    """
    logits: torch.Tensor
    target: torch.Tensor
    contributions: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    ierf: dict[str, torch.Tensor] = field(default_factory=dict)
    record: ForwardRecord | None = None


# ---------------------------------------------------------------------------------------------
# one step: sharing ratios of a conv+BN, and the scatter of relevance back through the taps
# ---------------------------------------------------------------------------------------------
def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_step_ratios(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module | None, v_ref: torch.Tensor,
                     eps: float = 1e-9) -> torch.Tensor:
    """Sharing ratios of a conv(+BN) step, one tap at a time.

    Args:
        x: ``[B, C_in, H, W]`` input PFVs (post-activation).
        conv, bn: the step (``groups == 1``); the conv bias, if any, joins the BN shift.
        v_ref: ``[B, C_out, H', W']`` the reference output PFVs ``v_j`` (the full residual sum when
            the step ends a residual branch, else the step's own output).
    Returns:
        ``μ [B, T, H', W']`` for the ``T = kh·kw`` taps; ``μ[:, t, j]`` is the share of ``v_j`` coming
        from the input position under tap ``t`` (0 where that falls in the padding).
    """
    if conv.groups != 1:
        raise ValueError(f"SRD supports groups=1 convolutions only, got groups={conv.groups}")
    kh, kw = conv.kernel_size
    sh, sw = _pair(conv.stride)
    ph, pw = _pair(conv.padding)
    dh, dw = _pair(conv.dilation)
    scale, shift = bn_affine(bn, conv.out_channels, x)
    if conv.bias is not None:
        shift = shift + scale * conv.bias.to(x.dtype)
    Ho, Wo = v_ref.shape[-2:]
    xp = F.pad(x, (pw, pw, ph, ph))
    w = conv.weight.to(x.dtype) * scale[:, None, None, None]
    inside = F.pad(torch.ones(1, 1, *x.shape[-2:], dtype=x.dtype, device=x.device), (pw, pw, ph, ph))
    dots, norms, valid = [], [], []
    for ky in range(kh):
        for kx in range(kw):
            sl = (slice(None), slice(None), slice(ky * dh, ky * dh + sh * (Ho - 1) + 1, sh),
                  slice(kx * dw, kx * dw + sw * (Wo - 1) + 1, sw))
            u = F.conv2d(xp[sl], w[:, :, ky, kx, None, None])
            dots.append((u * v_ref).sum(1))
            norms.append(u.norm(dim=1))
            valid.append(inside[sl][:, 0])
    dots, norms, valid = torch.stack(dots, 1), torch.stack(norms, 1), torch.stack(valid, 1)
    shift_dot = torch.einsum("c,bchw->bhw", shift, v_ref)
    # the shift is shared by ‖u‖; where every tap is zero (a dead region) it is shared evenly over the
    # in-image taps instead of being dropped, so relevance stays conserved
    total = norms.sum(1, keepdim=True)
    even = valid / valid.sum(1, keepdim=True).clamp_min(1)
    share = torch.where(total > 0, norms / total.clamp_min(torch.finfo(x.dtype).tiny), even)
    return (dots + shift_dot[:, None] * share) / _guarded_energy(v_ref, eps)[:, None]


def _guarded_energy(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``‖v_j‖²`` ``[B, H, W]`` plus a guard relative to the image's mean energy (scale-free), so a
    near-zero PFV cannot blow its ratios up and an all-zero one gives ratio 0, not NaN."""
    vv = (v * v).sum(1)
    return vv + eps * vv.mean((-1, -2), keepdim=True) + torch.finfo(v.dtype).tiny


def propagate(R: torch.Tensor, mu: torch.Tensor, kernel, stride, padding, dilation, in_hw) -> torch.Tensor:
    """``R_in[b, s, i] = Σ_{t, j: tap t of j is i} μ[b, t, j] · R[b, s, j]``.

    Args:
        R: ``[B, S, H', W']`` relevance stack at the step's output; mu: ``[B, T, H', W']``.
        in_hw: ``(H, W)`` of the input grid.
    Returns: ``[B, S, H, W]``.
    """
    B, S, Ho, Wo = R.shape
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    T = kh * kw
    one_hot = torch.eye(T, dtype=R.dtype, device=R.device).reshape(T, 1, kh, kw)
    mr = (mu[:, None] * R[:, :, None]).reshape(B * S, T, Ho, Wo)
    H, W = in_hw
    oph = H - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
    opw = W - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    out = F.conv_transpose2d(mr, one_hot, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                             output_padding=(max(oph, 0), max(opw, 0)))
    return out[:, :, :H, :W].reshape(B, S, H, W)


def _conv_back(R, x, conv, bn, v_ref, eps):
    mu = conv_step_ratios(x, conv, bn, v_ref, eps)
    return propagate(R, mu, conv.kernel_size, conv.stride, conv.padding, conv.dilation, x.shape[-2:])


def _maxpool_back(R, x, v, indices, pool: nn.MaxPool2d, eps):
    """Max-pool step: output ``j`` shares its relevance among window taps by the energy each won."""
    kh, kw = _pair(pool.kernel_size)
    sh, sw = _pair(pool.stride or pool.kernel_size)
    ph, pw = _pair(pool.padding)
    dh, dw = _pair(pool.dilation)
    H, W = x.shape[-2:]
    Ho, Wo = v.shape[-2:]
    oy = torch.arange(Ho, device=x.device)[:, None] * sh - ph
    ox = torch.arange(Wo, device=x.device)[None, :] * sw - pw
    energy = v * v
    total = _guarded_energy(v, eps)
    mus = []
    for ky in range(kh):
        for kx in range(kw):
            iy, ix = oy + ky * dh, ox + kx * dw
            flat = torch.where((iy >= 0) & (iy < H) & (ix >= 0) & (ix < W), iy * W + ix, -1)
            mus.append((energy * (indices == flat)).sum(1) / total)
    return propagate(R, torch.stack(mus, 1), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (H, W))


def _block_back(R, block, rec_block, eps):
    """Relevance at a block's pre-activation ``v`` → relevance at its input (= previous block's)."""
    branch = branch_modules(block)
    v = rec_block.v
    inputs = [rec_block.x] + rec_block.post  # input of each conv of the main branch
    # the last conv carries r = v - s; its ratios are taken against the full sum v
    Rm = _conv_back(R, inputs[-1], *branch[-1], v, eps)
    for k in range(len(branch) - 2, -1, -1):
        Rm = _conv_back(Rm, inputs[k], *branch[k], rec_block.pre[k], eps)
    if block.downsample is not None:
        conv, bn = block.downsample[0], block.downsample[1]
        Rs = _conv_back(R, rec_block.x, conv, bn, v, eps)
    else:
        mu_s = (rec_block.s * v).sum(1) / _guarded_energy(v, eps)
        Rs = R * mu_s[:, None]
    return Rm + Rs


def _one_hot_maps(positions: torch.Tensor, hw, dtype) -> torch.Tensor:
    """``positions [B, k]`` → ``[B, k, H, W]`` one-hot relevance maps."""
    B, k = positions.shape
    n = hw[0] * hw[1]
    if (positions < 0).any() or (positions >= n).any():
        raise ValueError(f"positions out of range [0, {n})")
    m = torch.zeros(B, k, n, dtype=dtype, device=positions.device)
    m.scatter_(2, positions[:, :, None], 1.0)
    return m.reshape(B, k, *hw)


# ---------------------------------------------------------------------------------------------
# the whole downward pass
# ---------------------------------------------------------------------------------------------
def _resolve_target(logits, target):
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.numel() == 1:
        target = target.expand(logits.shape[0])
    if target.numel() != logits.shape[0]:
        raise ValueError(f"target has {target.numel()} entries for {logits.shape[0]} images")
    if (target < 0).any() or (target >= logits.shape[1]).any():
        raise ValueError(f"target class out of range [0, {logits.shape[1]})")
    return target.clone()


def _check_finite(rec):
    values = rec.values if hasattr(rec, "values") else {name: b.v for name, b in rec.blocks.items()}
    for name, v in values.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"non-finite (NaN/inf) activations at {name}: check the input images and weights")


@torch.no_grad()
def srd_explain(adapter: ResNetAdapter, x: torch.Tensor, target=None, *, select: Selector | None = None,
                points=None, contrastive: bool = False, to_input: bool = False,
                eps: float = 1e-9) -> SRDResult:
    """SRD contributions of every position of every analysed point, and iERFs of selected PFVs.

    Args:
        adapter: a :class:`ResNetAdapter`.
        x: ``[B, C_in, H_in, W_in]`` images.
        target: class per image (``[B]`` or a scalar); default the predicted class.
        select: called top-down as ``select(point, contribution [B, H, W])``; returns ``[B]`` (or
            ``[B, k]``) flat positions whose iERF to compute at that point, or None for none there.
        points: points to report (default all).
        contrastive: start from ``w_c − mean_k w_k`` (per image), the notes' optional contrastive rule.
        to_input: also propagate the contributions to the input pixels (``contributions["input"]``);
            implied when ``select`` picks any PFV.
    Returns:
        :class:`SRDResult`.
    """
    points = adapter.check_points(points)
    rec = adapter.record(x)
    _check_finite(rec)
    tgt = _resolve_target(rec.logits, target)
    m = adapter.model
    last = rec.blocks[adapter.points[-1]]
    h = torch.relu(last.v)
    n = h.shape[-1] * h.shape[-2]
    w = m.fc.weight.to(h.dtype)
    b = m.fc.bias.to(h.dtype) if m.fc.bias is not None else torch.zeros(w.shape[0], dtype=h.dtype, device=h.device)
    if contrastive:
        w, b = w - w.mean(0, keepdim=True), b - b.mean()
    R = ((torch.einsum("bchw,bc->bhw", h, w[tgt]) + b[tgt][:, None, None]) / n)[:, None]  # [B, 1, H, W]
    res = SRDResult(logits=rec.logits, target=tgt, record=rec)
    stack: list[tuple[str, int, int, bool]] = []  # (point, first stack channel, k, squeeze)
    names = adapter.points
    lowest = min(names.index(p) for p in points)
    for k in range(len(names) - 1, -1, -1):
        name = names[k]
        if name in points:
            res.contributions[name] = R[:, 0].clone()
            pos = select(name, R[:, 0]) if select is not None else None
            if pos is not None:
                pos = pos.long()
                res.positions[name] = pos
                pos2 = pos[:, None] if pos.dim() == 1 else pos
                stack.append((name, R.shape[1], pos2.shape[1], pos.dim() == 1))
                R = torch.cat([R, _one_hot_maps(pos2, R.shape[-2:], R.dtype)], 1)
        if k <= lowest and not stack and not to_input:
            return res  # nothing left to carry further down
        R = _block_back(R, adapter.blocks[name], rec.blocks[name], eps)
    R = _stem_back(R, adapter, rec, eps)
    res.contributions["input"] = R[:, 0]
    for name, start, k, squeeze in stack:
        res.ierf[name] = R[:, start] if squeeze else R[:, start:start + k]
    return res


def _stem_back(R, adapter, rec, eps):
    m = adapter.model
    if isinstance(m.maxpool, nn.MaxPool2d):
        R = _maxpool_back(R, rec.stem_post, rec.pooled, rec.pool_indices, m.maxpool, eps)
    return _conv_back(R, rec.image, m.conv1, m.bn1, rec.stem_pre, eps)


# ---------------------------------------------------------------------------------------------
# gradient × input, the fast alternative
# ---------------------------------------------------------------------------------------------
def gradxinput_explain(adapter: ResNetAdapter, x: torch.Tensor, target=None, *, select: Selector | None = None,
                       points=None) -> SRDResult:
    """Gradient × input version of :func:`srd_explain` (same outputs, not conservative).

    Contribution of position ``i`` of a point: ``Σ_c v_ic · ∂z_target/∂v_ic``. iERF of the PFV
    ``v_p``: ``Σ_channels x · ∂⟨v_p, sg(v_p)⟩/‖sg(v_p)‖² / ∂x`` (one backward per point, batched).
    Adapters of token models (:class:`~gig_fast.models.transformer.TransformerAdapter`) may keep leading
    positions out of ``select`` (``unsampled_prefix``: a dropped class token) and turn the map into a
    token-grid iERF (``ierf_map``: summed over each patch).
    """
    points = adapter.check_points(points)
    with torch.no_grad():
        rec = adapter.record(x, keep="preact")
    _check_finite(rec)
    tgt = _resolve_target(rec.logits, target)
    xin = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        vs, logits = adapter.forward_points(xin)
        # the gradients of the class logit, returned rather than kept in `.grad` (retain_grad): the iERF
        # backward passes below run through the same tensors and would add to a kept `.grad` of every
        # point under the one they start from (they did, before: +1 at each sampled position above)
        names = [p for p in adapter.points if p in points]
        grads = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), [vs[p] for p in names] + [xin],
                                    retain_graph=True)
    grad_of = dict(zip(names, grads[:-1]))
    res = SRDResult(logits=logits.detach(), target=tgt, record=rec)
    res.contributions["input"] = (grads[-1] * xin).sum(1).detach()
    for name in reversed(adapter.points):
        if name not in points:
            continue
        contrib = (grad_of[name] * vs[name]).sum(1).detach()
        res.contributions[name] = contrib
        skip = adapter.unsampled_prefix(name) if hasattr(adapter, "unsampled_prefix") else 0
        pos = select(name, contrib[..., skip:] if skip else contrib) if select is not None else None
        if pos is None:
            continue
        pos = pos.long() + skip  # positions in the point's own numbering
        res.positions[name] = pos
        pos2 = pos[:, None] if pos.dim() == 1 else pos
        v = vs[name].flatten(2)  # [B, C, P]
        maps = []
        for k in range(pos2.shape[1]):
            vp = v[torch.arange(v.shape[0]), :, pos2[:, k]]  # [B, C]
            ref = vp.detach()
            scalar = ((vp * ref).sum(1) / (ref * ref).sum(1).clamp_min(1e-12)).sum()
            (g,) = torch.autograd.grad(scalar, xin, retain_graph=True)
            gxi = (g * xin).sum(1).detach()
            maps.append(adapter.ierf_map(gxi) if hasattr(adapter, "ierf_map") else gxi)
        res.ierf[name] = maps[0] if pos.dim() == 1 else torch.stack(maps, 1)
    return res


def explain(adapter, x, target=None, *, method: str = "srd", select=None, points=None):
    """Dispatch to :func:`srd_explain` (``"srd"``) or :func:`gradxinput_explain` (``"gradxinput"``)."""
    if method == "srd":
        if not getattr(adapter, "supports_srd", False):
            raise ValueError(f"SRD is implemented for ResNet blocks only; {type(adapter.model).__name__} needs "
                             "attribution='gradxinput'")
        return srd_explain(adapter, x, target, select=select, points=points)
    if method in ("gradxinput", "gxi"):
        return gradxinput_explain(adapter, x, target, select=select, points=points)
    raise ValueError(f"unknown attribution method {method!r}; valid: 'srd', 'gradxinput'")
