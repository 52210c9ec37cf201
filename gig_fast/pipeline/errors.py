"""Error nodes: the part of each layer's change that its concepts do not explain.

GIG integrates along ``X(α) = β + α·U V`` (docs/design.md §1.5), so the concepts of layer a account for
``T(F_ab(X̃)) − T(F_ab(β))``, the change of a target ``T`` from the baseline β to the *reconstruction*
``X̃ = β + U V``; the model itself runs on the real pre-activation ``X = X̃ + E``, with the
reconstruction residual ``E = X − β − U V`` (rel-L2 of 0.2–0.3 on the demo). Continue the path from
``X̃`` to ``X`` along ``X̃ + α·E``: the IG of ``E`` on that second leg is the **error node** of layer a,

    error(a → T) = ∫₀¹ ⟨∇T(F_ab(X̃ + αE)), E⟩ dα = T(F_ab(X)) − T(F_ab(X̃))

(completeness on a straight line is exact, so the two forwards give the integral without quadrature
error). Over the joined path β → X̃ → X the concepts and the error node sum to the model's real change
``T(F_ab(X)) − T(F_ab(β))`` up to the concepts' quadrature gap, and the concepts keep the attributions
the paper defines (the first leg is unchanged): turning error nodes on adds nodes, it changes none.

:func:`error_nodes` is the pass after stage 4: it reloads each chunk of explained images, records their
real pre-activations, rebuilds ``X̃`` from the stage-3 codes and evaluates, per transition, every target
that the image's graph (its own targets) and its class's graph (the class's top targets) hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as dist
from .image_loader import image_batches
from .selection import CLASSES, trans_dir, transitions
from .stages import chunk_ids, load_concepts
from .files import BackgroundWriter, is_complete, save_npz
from ..ops import sparse_reconstruct
from ..run_folder import CODES, ERRORS, chunk_file, chunk_files

__all__ = ["error_nodes", "error_keys", "target_values", "transition_errors", "reconstruction", "load_errors",
           "class_error_sums", "error_metrics"]

def error_keys(pipe) -> list[str]:
    """The arrays of a finished ``errors/chunk_XXXXX.npz`` (a damaged or partial file is recomputed)."""
    return ["image"] + [f"{a}|{key}" for a, _ in transitions(pipe) for key in ("own_error", "own_span", "class_error")]


def target_values(out: torch.Tensor, targets: torch.Tensor, Vb: torch.Tensor | None, probability: bool) -> torch.Tensor:
    """The GIG targets of ``targets [n, T]`` on F_ab's output rows ``out [n, ...]`` (row i's own targets).

    ``Vb`` None: ``out`` is logits ``[n, n_classes]`` and a target is a class (softmax probability, or the
    logit with ``probability=False``); else a target is concept ``t`` of b, ``T = Σ_positions ⟨Ω, v_t/‖v_t‖⟩``
    on ``out [n, C_b, H_b, W_b]`` — :class:`gig_fast.ConceptTarget` and :class:`gig_fast.ClassTarget`.
    Returns ``[n, T]``.
    """
    if Vb is None:
        scores = torch.softmax(out, dim=1) if probability else out
        return scores.gather(1, targets)
    unit = Vb / Vb.norm(dim=1, keepdim=True)
    summed = out.flatten(2).sum(2)  # [n, C_b]: the projection is linear, so sum the positions first
    return torch.einsum("nc,ntc->nt", summed, unit.to(out.dtype)[targets])


def reconstruction(idx: torch.Tensor, val: torch.Tensor, V: torch.Tensor, beta: torch.Tensor, H: int, W: int
                   ) -> torch.Tensor:
    """``X̃ = β + U V`` as F_ab's input ``[B, C, H, W]`` from the stage-3 codes ``idx``/``val [B, P, s]``."""
    B, P, s = idx.shape
    rec = sparse_reconstruct(idx.reshape(B * P, s), val.reshape(B * P, s).to(V.dtype), V, beta)
    return rec.reshape(B, H, W, -1).permute(0, 3, 1, 2)


def transition_errors(f_ab, X, X_rec, base, own, top, Vb, probability: bool):
    """``(own_error, own_span, class_error)`` of a batch of images in one transition a → b: the error node's
    value for each image's own targets ``own [B, T_o]`` and for its class's top targets ``top [B, n_top]``,
    and the real change ``T(X) − T(β)`` of the own targets — one forward of ``F_ab`` (``f_ab``) on the real
    ``X``, the reconstructions ``X_rec`` (``[B, C, H, W]`` each) and ``base`` (β, ``[1, C, H, W]``).
    ``Vb``, ``probability``: as in :func:`target_values`."""
    with torch.no_grad():
        out = f_ab(torch.cat([X, X_rec, base]))
    B = X.shape[0]
    real, rec, zero = out[:B], out[B:2 * B], out[2 * B:].expand(B, *out.shape[1:])
    targets = torch.cat([own, top], dim=1)
    diff = target_values(real, targets, Vb, probability) - target_values(rec, targets, Vb, probability)
    span = target_values(real, own, Vb, probability) - target_values(zero, own, Vb, probability)
    n_own = own.shape[1]
    return diff[:, :n_own], span, diff[:, n_own:]


def _chunk_targets(pipe, a: str, b: str, name: str, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's own targets ``[B, T_o]`` and its class's top targets ``[B, n_top]`` in the transition
    a → b, from stage 4's chunk file ``name``."""
    with np.load(trans_dir(pipe, a, b) / name, allow_pickle=False) as z:
        own, classes, targets, n_top = z["own_targets"], z["classes"], z["targets"], int(z["n_top"])
    slots = np.searchsorted(classes, groups)
    return own, targets[slots, :n_top]


@dataclass
class _Slice:
    """What the error pass needs of one transition a → b: a's concepts ``V [K_a, C_a]`` and ``beta [C_a]``,
    b's concepts ``Vb`` (None for b = classes) and ``f_ab``."""
    a: str
    b: str
    V: torch.Tensor
    beta: torch.Tensor
    Vb: torch.Tensor | None
    f_ab: object

    @classmethod
    def of(cls, pipe, a: str, b: str) -> "_Slice":
        concepts = load_concepts(pipe, a)
        Vb = None if b == CLASSES else load_concepts(pipe, b)["V"].to(pipe.device)
        return cls(a, b, concepts["V"].to(pipe.device), concepts["beta"].to(pipe.device), Vb,
                   pipe.adapter.f_ab(a, None if b == CLASSES else b))


def _chunk_errors(pipe, slices: dict, codes_path, chunk: np.ndarray, batches: list, loaded) -> dict[str, torch.Tensor]:
    """The arrays of one error file: every transition's error nodes for the images ``chunk`` of the
    stage-3 file ``codes_path``, batch by batch (``loaded`` yields their images)."""
    cfg = pipe.config
    with np.load(codes_path, allow_pickle=False) as z:
        images = z["image"]
        groups = z["label" if cfg.class_by == "label" else "prediction"]
        code = {a: (torch.from_numpy(z[f"{a}|idx"]), torch.from_numpy(z[f"{a}|val"])) for a in slices}
    if not np.array_equal(images, chunk):
        raise ValueError(f"{codes_path} does not hold the images of its chunk; delete {pipe.work} and rerun")
    wanted = {a: _chunk_targets(pipe, a, s.b, codes_path.name, groups) for a, s in slices.items()}
    parts: dict[str, list] = {}
    row = 0
    for batch in batches:
        x, _ = next(loaded)
        with torch.no_grad():
            rec = pipe.adapter.record(x, keep="preact")
        rows = slice(row, row + len(batch))
        row += len(batch)
        for a, s in slices.items():
            X = rec.preact(a).to(s.V.dtype)
            H, W = X.shape[-2:]
            X_rec = reconstruction(code[a][0][rows].to(pipe.device), code[a][1][rows].to(pipe.device), s.V, s.beta, H, W)
            base = s.beta.reshape(1, -1, 1, 1).expand(1, -1, H, W)
            own, top = (torch.from_numpy(np.ascontiguousarray(t[rows])).to(pipe.device) for t in wanted[a])
            values = transition_errors(s.f_ab, X, X_rec, base, own, top, s.Vb, cfg.class_probability)
            for key, value in zip(("own_error", "own_span", "class_error"), values):
                parts.setdefault(f"{a}|{key}", []).append(value.double().cpu())
    return {"image": torch.from_numpy(images), **{k: torch.cat(v) for k, v in parts.items()}}


def error_nodes(pipe) -> None:
    """The error nodes of every explained image and transition (after stage 4; ``error_nodes`` option).

    Writes ``errors/chunk_XXXXX.npz`` (the chunks of stages 3 and 4) with ``image [B]`` and, per
    transition a → b, ``a|own_error [B, T_o]`` (the error node of a to each of the image's own targets of
    b, as stage 4's ``own_targets``), ``a|own_span [B, T_o]`` (the real change ``T(F_ab(X)) − T(F_ab(β))``
    of those targets) and ``a|class_error [B, n_top]`` (to its class's top targets of b, the class graph's).
    """
    cfg = pipe.config
    slices = {a: _Slice.of(pipe, a, b) for a, b in transitions(pipe)}
    chunks = chunk_ids(pipe.explain_ids, cfg.chunk_images)
    files = [chunk_file(pipe.work / ERRORS, ci) for ci in range(len(chunks))]
    todo = [ci for ci in range(len(chunks)) if dist.owns(ci) and not is_complete(files[ci], error_keys(pipe))]
    batches = {ci: [chunks[ci][i:i + cfg.batch_size] for i in range(0, len(chunks[ci]), cfg.batch_size)] for ci in todo}
    loaded = image_batches(pipe, [b for ci in todo for b in batches[ci]])
    with BackgroundWriter(save_npz) as writer:  # the next chunk computes while this one is written
        for ci in todo:
            codes = chunk_file(pipe.work / CODES, ci)
            writer.save_npz(files[ci], **_chunk_errors(pipe, slices, codes, chunks[ci], batches[ci], loaded))
    dist.barrier()


def load_errors(pipe, name: str) -> dict[str, np.ndarray] | None:
    """The error-node file of code chunk ``name`` (None when the run has no error nodes)."""
    path = pipe.work / ERRORS / name
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def class_error_sums(pipe, a: str) -> np.ndarray | None:
    """``[n_classes, n_top]`` the error node of ``a`` to each of a class's top targets of the layer above,
    summed over the class's explained images (the class graph's error node); None without error nodes."""
    out = None
    for cpath in chunk_files(pipe.work / CODES):
        errors = load_errors(pipe, cpath.name)
        if errors is None:
            return None
        with np.load(cpath, allow_pickle=False) as z:
            groups = z["label" if pipe.config.class_by == "label" else "prediction"]
        values = errors[f"{a}|class_error"]
        if out is None:
            out = np.zeros((pipe.num_classes, values.shape[1]))
        np.add.at(out, groups, values)
    return out


def error_metrics(pipe) -> dict | None:
    """``metrics.json``'s ``error_nodes``: per transition ``a->b`` how much of the model's real change of the
    image graphs' targets the error node carries, ``|error| / |T(F_ab(X)) − T(F_ab(β))|`` over every (image,
    own target) pair: ``median_share``, ``p90_share``, ``n``. None without error nodes."""
    shares: dict[str, list] = {}
    for cpath in chunk_files(pipe.work / CODES):
        errors = load_errors(pipe, cpath.name)
        if errors is None:
            return None
        for a, b in transitions(pipe):
            share = np.abs(errors[f"{a}|own_error"]) / np.maximum(np.abs(errors[f"{a}|own_span"]), 1e-30)
            shares.setdefault(f"{a}->{b}", []).append(share.ravel())
    out = {}
    for key, parts in shares.items():
        share = np.concatenate(parts)
        out[key] = {"median_share": float(np.median(share)), "p90_share": float(np.quantile(share, 0.9)),
                    "n": int(share.size)}
    return out
