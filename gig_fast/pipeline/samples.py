"""The stage-1 PFV–iERF dataset read back from a work folder: rows numbered across the chunk files, the
rows nearest in cosine to given concepts, and the samples' metadata and iERF maps (for concept cards,
iERF crops and the appendix figures). Memory stays at one chunk of PFVs; samples are read row by row
from memory maps of the chunk files (a crop needs one 28×28 iERF, not the chunk's 3,000)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..run_folder import STAGE1, chunk_files
from .files import npz_member, npz_rows

__all__ = ["stage1_files", "nearest_rows", "stage1_samples"]


def stage1_files(work: Path) -> tuple[list[Path], np.ndarray]:
    """The stage-1 chunk files in order and ``[files + 1]`` their first global rows (and the total)."""
    files = chunk_files(Path(work) / STAGE1)
    starts, n = [], 0
    for f in files:
        starts.append(n)
        n += len(npz_member(f, "image"))
    return files, np.array(starts + [n])


# float32 candidates kept per concept beyond k, then re-scored in float64: a row of the exact top k is
# lost only when more than MARGIN rows lie within float32 rounding (~1e-6) of the k-th cosine.
MARGIN = 8


def nearest_rows(work: Path, layer: str, V: torch.Tensor, beta: torch.Tensor, labels: torch.Tensor,
                 concepts: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept the ``k`` stage-1 rows of ``layer`` nearest in cosine to its vector (``x − β`` against
    ``v_q``; paper Fig. 1 "top 10 nearest embeddings"), nearest first.

    One float32 pass over the chunk files keeps ``k + MARGIN`` candidates per concept (the GEMM of every
    concept of the demo's layer4.2 against its 30,000 PFVs: half the time of float64); the candidates'
    cosines are then computed again in float64, which orders them.

    Args: V ``[K, C]`` and beta ``[C]`` the layer's concepts, labels int64 ``[N]`` the stage-1 cluster of
    every row, concepts the ``Q`` concept ids.
    Returns: ``(rows [Q, k] global stage-1 rows, cosines [Q, k] float64, member [Q, k] bool: in the
    concept's cluster)``.
    """
    files, starts = stage1_files(work)
    qs = list(concepts)
    V64 = torch.nn.functional.normalize(V.double()[qs], dim=1)  # [Q, C]
    V32, beta32 = V64.float(), beta.float()
    keep = k + MARGIN
    cand_val = torch.empty(len(qs), 0)
    cand_row = torch.empty(len(qs), 0, dtype=torch.long)
    for f, start in zip(files, starts.tolist()):
        X = torch.from_numpy(np.array(npz_member(f, f"{layer}|pfv"))).float() - beta32
        cos = V32 @ torch.nn.functional.normalize(X, dim=1).T  # [Q, n]
        vals, pick = torch.topk(cos, min(keep, cos.shape[1]), dim=1)
        vals, best = torch.topk(torch.cat([cand_val, vals], 1), min(keep, cand_val.shape[1] + vals.shape[1]), dim=1)
        cand_row = torch.gather(torch.cat([cand_row, pick + start], 1), 1, best)
        cand_val = vals
    X = torch.from_numpy(_pfv_rows(files, starts, layer, cand_row.numpy())).double() - beta.double()  # [Q, keep, C]
    cos64 = torch.einsum("qc,qjc->qj", V64, torch.nn.functional.normalize(X, dim=2))
    best_val, pick = torch.topk(cos64, min(k, cos64.shape[1]), dim=1)
    best_row = torch.gather(cand_row, 1, pick)
    member = labels.long()[best_row] == torch.tensor(qs)[:, None]
    return best_row.numpy(), best_val.numpy(), member.numpy()


def _pfv_rows(files: list[Path], starts: np.ndarray, layer: str, rows: np.ndarray) -> np.ndarray:
    """The stage-1 PFVs of ``layer`` at global ``rows`` (any shape), shaped ``rows.shape + (C,)``."""
    flat = rows.ravel()
    which = np.searchsorted(starts, flat, side="right") - 1
    out = None
    for fi in np.unique(which).tolist():
        sel = which == fi
        part = npz_rows(files[fi], f"{layer}|pfv", flat[sel] - starts[fi])
        if out is None:
            out = np.empty((flat.size, part.shape[1]), dtype=part.dtype)
        out[sel] = part
    return out.reshape(*rows.shape, -1)


def stage1_samples(work: Path, layer: str, rows, files=None) -> tuple[dict[int, tuple[int, int, int]], dict[int, np.ndarray]]:
    """For global stage-1 ``rows`` of ``layer``: ``{row: (image, position, label)}`` and ``{row: iERF map
    [H, W]}`` (empty when the run kept no iERFs, ``store_ierf=False``). ``files``: :func:`stage1_files`
    when the caller has it."""
    files, starts = files or stage1_files(work)
    meta: dict[int, tuple[int, int, int]] = {}
    maps: dict[int, np.ndarray] = {}
    wanted = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= starts[-1]):
        raise ValueError(f"stage-1 rows must be in 0..{int(starts[-1]) - 1}")
    which = np.searchsorted(starts, wanted, side="right") - 1
    for fi in np.unique(which).tolist():
        glob = wanted[which == fi]
        local = glob - int(starts[fi])
        f = files[fi]
        img, pos, lab = (npz_rows(f, key, local) for key in ("image", f"{layer}|position", "label"))
        try:
            ierf = npz_rows(f, f"{layer}|ierf", local)
        except KeyError:
            ierf = None
        for j, row in enumerate(glob.tolist()):
            meta[row] = (int(img[j]), int(pos[j]), int(lab[j]))
            if ierf is not None:
                maps[row] = ierf[j]
    return meta, maps
