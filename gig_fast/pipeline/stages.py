"""The four stages of a GIG run (DESIGN.md §1.2–1.5), each resumable per layer / per chunk of images.

Work files live in ``<out>/work-<config key>/``; every file is written atomically, so a run killed
at any point (SIGKILL included) resumes from the last finished chunk and ends with the same results.
Every image draws its stage-1 samples from its own generator (seeded by ``seed``, the image and the
layer), so results do not depend on where a run stopped nor on ``chunk_images``/``batch_size``.
A resumed stage checks each file it would skip (:func:`~.store.is_complete`): a damaged one is named
in a warning and computed again.

Under ``torchrun`` (:mod:`.distributed`) chunk ``ci`` of stages 1, 3 and 4 is computed by rank
``ci % world`` only, every stage (and every GIG layer transition) ends at a barrier, stage 2 runs the
k-means collectively, and rank 0 writes the concept files. A single process computes every chunk.
"""
from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..concepts import ConceptBank
from ..gig import ClassTarget, ConceptTarget, gig
from ..ops import sparse_code, sparse_reconstruct
from ..ops.checks import check_finite
from ..ops.sparse_code import SparseCodeConvergenceWarning
from ..srd import explain
from . import distributed as dist
from .store import is_complete, load_npz, save_npz

__all__ = ["pfv_dataset", "extract_concepts", "decompose", "attribute", "chunk_ids", "concept_bank", "bank_dir", "CLASSES"]

CLASSES = "classes"  # the name of the last graph layer (the class targets)


def chunk_ids(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def _bar(pipe, it, desc, total=None):
    # one bar per job, not one per rank
    return tqdm(it, desc=desc, total=total, disable=not pipe.config.progress or not dist.is_main(), leave=False)


def _batches(ids: np.ndarray, size: int):
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


# ---------------------------------------------------------------------------------------------
# stage 1: PFV–iERF dataset
# ---------------------------------------------------------------------------------------------
def image_generator(seed: int, image: int, point: str) -> torch.Generator:
    """The random generator of one image's stage-1 draws at one layer: a function of the run's seed, the
    image (its dataset index) and the layer only — not of the chunk or batch it falls in, so a resumed
    or rechunked run draws the same samples."""
    key = np.random.SeedSequence([int(seed), int(image), zlib.crc32(point.encode())]).generate_state(2)
    return torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))


def _sampler(k: int, seed: int, images: np.ndarray):
    """``select`` for SRD: k positions per image with probability ∝ max(contribution, 0) (uniform
    when no position contributes positively), without replacement; image ``images[i]`` draws with
    :func:`image_generator`."""
    def select(point, contrib):
        w = contrib.detach().flatten(1).double().clamp_min(0).cpu()
        if k > w.shape[1]:
            raise ValueError(f"pfvs_per_image={k} exceeds the {w.shape[1]} positions of {point}")
        dead = w.sum(1) <= 0
        w[dead] = 1.0
        rows = [torch.multinomial(w[i], k, replacement=False, generator=image_generator(seed, image, point))
                for i, image in enumerate(images.tolist())]
        return torch.stack(rows).to(contrib.device)
    return select


def pfv_dataset(pipe) -> list[Path]:
    """Stage 1: for each concept image and analysed layer, sample ``pfvs_per_image`` PFVs by their
    contribution to the class logit and keep each with its iERF (DESIGN.md §1.2).

    Writes ``stage1/chunk_XXXXX.npz`` with, per layer ``L``: ``L|pfv [n, C]`` float32,
    ``L|ierf [n, H_in, W_in]`` (``ierf_dtype``; only with ``store_ierf``), ``L|position [n]``, and ``image [n]``, ``label [n]``,
    ``target [n]`` (the explained class). Returns the chunk files in order.
    """
    cfg, files = pipe.config, []
    ids = pipe.concept_ids
    chunks = chunk_ids(ids, cfg.chunk_images)
    for ci, chunk in enumerate(_bar(pipe, chunks, "stage 1: PFV–iERF dataset")):
        path = pipe.work / "stage1" / f"chunk_{ci:05d}.npz"
        files.append(path)
        if not dist.owns(ci) or is_complete(path, _stage1_keys(pipe)):  # another rank's chunk, or done (resume)
            continue
        k = cfg.pfvs_per_image
        parts: dict[str, list] = {}
        for batch in _batches(chunk, cfg.batch_size):
            x, y = pipe.load_images(batch)
            select = _sampler(k, cfg.seed, batch)
            res = explain(pipe.adapter, x, pipe.explained_class(x, y), method=cfg.attribution,
                          select=select if cfg.store_ierf else None, points=pipe.points)
            if not cfg.store_ierf:  # contributions only: sample top-down as the SRD pass would
                res.positions = {p: select(p, res.contributions[p]) for p in reversed(pipe.points)}
            for point in pipe.points:
                v = res.record.preact(point).flatten(2)  # [B, C, P]
                pos = res.positions[point].reshape(len(batch), k)
                pfv = torch.gather(v, 2, pos[:, None, :].expand(-1, v.shape[1], -1)).permute(0, 2, 1)
                parts.setdefault(f"{point}|pfv", []).append(pfv.reshape(-1, v.shape[1]).float().cpu())
                parts.setdefault(f"{point}|position", []).append(pos.reshape(-1).cpu())
                if cfg.store_ierf:
                    ierf = res.ierf[point].reshape(len(batch) * k, *x.shape[-2:])
                    parts.setdefault(f"{point}|ierf", []).append(ierf.to(getattr(torch, cfg.ierf_dtype)).cpu())
            parts.setdefault("image", []).append(torch.as_tensor(batch).repeat_interleave(k))
            parts.setdefault("label", []).append(y.cpu().repeat_interleave(k))
            parts.setdefault("target", []).append(res.target.cpu().repeat_interleave(k))
        save_npz(path, **{key: torch.cat(v) for key, v in parts.items()})
    dist.barrier()  # stage 2 reads every rank's chunks
    return files


def _stage1_keys(pipe) -> list[str]:
    """The arrays a stage-1 chunk must hold (what the later stages read)."""
    return ["image", "label"] + [f"{p}|{key}" for p in pipe.points for key in ("pfv", "position")]


def load_pfvs(pipe, point: str) -> dict[str, np.ndarray]:
    """The stage-1 samples of one layer: ``pfv [N, C]``, ``position``, ``image``, ``label`` (no iERFs)."""
    out: dict[str, list] = {}
    for ci in range(len(chunk_ids(pipe.concept_ids, pipe.config.chunk_images))):
        with np.load(pipe.work / "stage1" / f"chunk_{ci:05d}.npz", allow_pickle=False) as z:
            for key in ("pfv", "position"):
                out.setdefault(key, []).append(z[f"{point}|{key}"])
            for key in ("image", "label"):
                out.setdefault(key, []).append(z[key])
    return {k: np.concatenate(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# stage 2: concepts
# ---------------------------------------------------------------------------------------------
def n_concepts(pipe, point: str) -> int:
    cfg = pipe.config
    return int(cfg.k) if cfg.k is not None else max(1, int(round(cfg.k_factor * pipe.adapter.channels(point))))


CONCEPT_KEYS = ("V", "beta", "labels", "sizes", "representatives", "rep_cosine")


def extract_concepts(pipe) -> dict[str, Path]:
    """Stage 2: bisecting spherical k-means per layer (DESIGN.md §1.3) on the stage-1 PFVs.

    Writes ``concepts/<layer>.npz``: ``V [K, C]`` (concept vectors = cluster means of ``x − β``),
    ``beta [C]`` (``adapter.baseline``: the BN shift, or the mean of the PFVs where no BN feeds the
    point: transformers, ConvNeXt), ``labels [N]``, ``sizes [K]``, ``representatives [K, r]`` (stage-1 row indices of the
    members closest in cosine, −1 padded) and ``rep_cosine [K, r]``.
    """
    cfg, files = pipe.config, {}
    for point in _bar(pipe, pipe.points, "stage 2: concepts"):
        path = pipe.work / "concepts" / f"{point}.npz"
        files[point] = path
        if is_complete(path, CONCEPT_KEYS):  # written by rank 0 before the last barrier: every rank agrees
            continue
        data = load_pfvs(pipe, point)
        X = torch.from_numpy(data["pfv"]).to(pipe.device)
        N, K = X.shape[0], n_concepts(pipe, point)
        if K > N:
            raise ValueError(f"K={K} concepts requested at {point} but only N={N} PFVs were sampled; "
                             "lower k / k_factor or raise concept_images / pfvs_per_image")
        if not torch.isfinite(X).all():
            raise ValueError(f"non-finite (NaN/inf) PFVs at {point}: check the model weights and inputs")
        beta = pipe.adapter.baseline(point, X)  # the BN shift; a model without one: the mean PFV (ViTs)
        V, labels = dist.bisecting_kmeans(X, K, beta, cfg.seed, cfg.kmeans_mode)
        V, labels = V.to(X).detach(), labels.to(X.device).long()
        if dist.is_main():  # every rank holds the same concepts; one writes them
            reps, cos = _representatives(X - beta, V, labels, cfg.representatives)
            save_npz(path, V=V.float(), beta=beta.float(), labels=labels,
                     sizes=torch.bincount(labels, minlength=K), representatives=reps, rep_cosine=cos)
        del X, data
        dist.barrier()
    return files


def _representatives(Xc: torch.Tensor, V: torch.Tensor, labels: torch.Tensor, r: int):
    """Per concept the ``r`` members closest in cosine to its vector (``[K, r]`` indices, −1 padded)."""
    K = V.shape[0]
    cos = torch.nn.functional.cosine_similarity(Xc, V[labels], dim=1).double().cpu()
    labels = labels.cpu()
    order = torch.argsort(labels * 4.0 - cos, stable=True)  # by label, then cosine descending
    reps = torch.full((K, r), -1, dtype=torch.long)
    rcos = torch.zeros(K, r)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, torch.arange(K))
    counts = torch.bincount(sorted_labels, minlength=K)
    for j in torch.nonzero(counts).flatten().tolist():
        n = int(min(r, counts[j]))
        sel = order[starts[j]: starts[j] + n]
        reps[j, :n] = sel
        rcos[j, :n] = cos[sel].float()
    return reps, rcos


def load_concepts(pipe, point: str) -> dict[str, torch.Tensor]:
    """The concept file of ``point`` as tensors; V and β are checked for NaN/Inf once, here (the ops that
    stages 3 and 4 call with them would refuse them too, but could not name the file)."""
    path = pipe.work / "concepts" / f"{point}.npz"
    d = {k: torch.from_numpy(v) for k, v in load_npz(path).items()}
    try:
        check_finite(V=d.get("V"), beta=d.get("beta"))
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {e}; delete it to compute the concepts again") from None
    return d


def bank_dir(out: Path, point: str) -> Path:
    """The folder of the concept bank of ``point`` in the output folder ``out``: ``out/concepts/<point>``."""
    if not point or point.startswith(".") or any(ch in point for ch in "/\\:"):
        raise ValueError(f"layer name {point!r} cannot name a concept bank folder")
    return Path(out) / "concepts" / point


def concept_bank(pipe, point: str) -> ConceptBank:
    """The concepts of ``point`` with the settings that made them, as a shareable :class:`~gig_fast.concepts.ConceptBank`."""
    cfg, c = pipe.config, load_concepts(pipe, point)
    extraction = {k: getattr(cfg, k) for k in ("k", "k_factor", "kmeans_mode", "concept_images", "pfvs_per_image",
                                               "attribution", "seed", "dataset", "split")}
    return ConceptBank(point, c["V"], c["beta"], c["sizes"], model={"arch": cfg.model, "weights": cfg.weights},
                       extraction=extraction, coding=cfg.code_options(), run_key=cfg.key())


# ---------------------------------------------------------------------------------------------
# stage 3: decomposition
# ---------------------------------------------------------------------------------------------
def _code(X, V, beta, cfg):
    """Sparse codes of ``X [n, C]`` on ``V`` and the number of rows the coder stopped at its iteration cap
    (reported per layer in metrics.json as ``not_converged``, instead of a warning per batch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparseCodeConvergenceWarning)
        idx, val, info = sparse_code(X, V, bias=beta, return_info=True, **cfg.code_options())
    return idx, val, info.n_unconverged


def _code_keys(pipe) -> list[str]:
    """The arrays a stage-3 chunk must hold (what stage 4, the graph and the metrics read)."""
    return ["image", "label", "prediction"] + [f"{p}|{key}" for p in pipe.points for key in ("idx", "val", "count")]


def decompose(pipe) -> list[Path]:
    """Stage 3: code every PFV of the explained images on its layer's concepts (DESIGN.md §1.4).

    Writes ``codes/chunk_XXXXX.npz`` with ``image``, ``label``, ``prediction`` and, per layer ``L``:
    ``L|idx [B, P, s]`` int64 (−1 padded), ``L|val [B, P, s]`` float32, ``L|rel_l2_sum``,
    ``L|l0_sum``, ``L|count`` (for the per-layer rel-L2 and l0 ratio), ``L|not_converged`` (rows the
    coder stopped at its iteration cap).
    """
    cfg, files = pipe.config, []
    concepts = {p: load_concepts(pipe, p) for p in pipe.points}
    for ci, chunk in enumerate(_bar(pipe, chunk_ids(pipe.explain_ids, cfg.chunk_images), "stage 3: decomposition")):
        path = pipe.work / "codes" / f"chunk_{ci:05d}.npz"
        files.append(path)
        if not dist.owns(ci) or is_complete(path, _code_keys(pipe)):
            continue
        out: dict[str, list] = {}
        for batch in _batches(chunk, cfg.batch_size):
            x, y = pipe.load_images(batch)
            with torch.no_grad():
                rec = pipe.adapter.record(x, keep="preact")
            out.setdefault("image", []).append(torch.as_tensor(batch))
            out.setdefault("label", []).append(y.cpu())
            out.setdefault("prediction", []).append(rec.logits.argmax(1).cpu())
            for point in pipe.points:
                v = rec.preact(point)
                if not torch.isfinite(v).all():
                    raise ValueError(f"non-finite (NaN/inf) activations at {point} for images {batch.tolist()[:5]}…")
                B, C, H, W = v.shape
                X = v.permute(0, 2, 3, 1).reshape(-1, C)
                V, beta = concepts[point]["V"].to(X), concepts[point]["beta"].to(X)
                idx, val, not_converged = _code(X, V, beta, cfg)
                recon = sparse_reconstruct(idx, val.to(X), V, beta)
                rel = (X - recon).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)
                l0 = 1.0 - (idx >= 0).sum(1).double() / V.shape[0]
                s = idx.shape[1]
                out.setdefault(f"{point}|idx", []).append(idx.reshape(B, H * W, s).cpu())
                out.setdefault(f"{point}|val", []).append(val.reshape(B, H * W, s).float().cpu())
                out.setdefault(f"{point}|rel_l2_sum", []).append(rel.double().sum().reshape(1).cpu())
                out.setdefault(f"{point}|l0_sum", []).append(l0.sum().reshape(1).cpu())
                out.setdefault(f"{point}|count", []).append(torch.tensor([X.shape[0]]))
                out.setdefault(f"{point}|not_converged", []).append(torch.tensor([not_converged]))
        arrays = {}
        for key, parts in out.items():
            if key.endswith("|idx") or key.endswith("|val"):
                s = max(p.shape[-1] for p in parts)
                fill = -1 if key.endswith("|idx") else 0.0
                parts = [torch.nn.functional.pad(p, (0, s - p.shape[-1]), value=fill) for p in parts]
                arrays[key] = torch.cat(parts)
            elif key.endswith("_sum") or key.endswith("|count") or key.endswith("|not_converged"):
                arrays[key] = torch.stack(parts).sum(0)
            else:
                arrays[key] = torch.cat(parts)
        save_npz(path, **arrays)
    dist.barrier()  # stage 4 reads every rank's codes
    return files


# ---------------------------------------------------------------------------------------------
# stage 4: GIG
# ---------------------------------------------------------------------------------------------
def transitions(pipe) -> list[tuple[str, str]]:
    """Layer pairs (a, b) top-down: (last, classes), then (previous, last), …"""
    pts = pipe.points
    pairs = [(pts[-1], CLASSES)] + [(pts[i], pts[i + 1]) for i in range(len(pts) - 2, -1, -1)]
    return pairs


def trans_dir(pipe, a, b) -> Path:
    """The folder of the GIG chunk files of the transition ``a → b``."""
    return pipe.work / "gig" / f"{a}__{b}"


def _class_sums(pipe, a: str, b: str):
    """Per chunk file of (a → b): ``(classes [n], class_sum [n, T, K_a])`` (older files hold every class)."""
    for path in sorted(trans_dir(pipe, a, b).glob("chunk_*.npz")):
        with np.load(path, allow_pickle=False) as z:
            sums = z["class_sum"]
            classes = z["classes"] if "classes" in z.files else np.arange(sums.shape[0])
        yield classes, sums


def class_scores(pipe, a: str, b: str) -> np.ndarray:
    """``[n_classes, K_a]`` score of each concept of ``a`` per class: Σ over the class's images of its
    GIG to the class (b = classes) or to the class's top concepts of ``b`` (summed over those)."""
    total = None
    for classes, sums in _class_sums(pipe, a, b):
        if total is None:
            total = np.zeros((pipe.num_classes, sums.shape[2]), dtype=np.float64)
        total[classes] += sums.sum(1)  # [n, T, K] → [n, K]
    return total


def class_pair_weights(pipe, a: str, b: str, sources: np.ndarray) -> np.ndarray:
    """``[n_classes, T, S]``: Σ over each class's images of GIG(q → t-th top target of b) for its
    ``sources [n_classes, S]`` concepts q of ``a`` (gathered chunk by chunk: never ``[n_classes, T, K_a]``)."""
    total = None
    for classes, sums in _class_sums(pipe, a, b):
        if total is None:
            total = np.zeros((pipe.num_classes, sums.shape[1], sources.shape[1]), dtype=np.float64)
        total[classes] += np.take_along_axis(sums, sources[classes][:, None, :], axis=2)
    return total


def top_sets(pipe, point: str) -> np.ndarray:
    """``[n_classes, top]`` the top concepts of ``point`` per class (by the score from the layer above)."""
    pts = pipe.points
    above = CLASSES if point == pts[-1] else pts[pts.index(point) + 1]
    scores = class_scores(pipe, point, above)
    k = min(pipe.config.top_concepts, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# Each image keeps its strongest sources (by Σ_t |GIG|) per transition for its own graph (graph.py
# then draws the top ``top_concepts`` of them by signed strength): a pool of 32, or more when more are drawn.
IMAGE_CANDIDATES = 32


def attribute(pipe) -> None:
    """Stage 4: GIG per explained image, top-down (DESIGN.md §1.5–1.6).

    For (last layer → classes) the target is the image's class (``class_by``); for (a → b) the
    targets are the top concepts of ``b`` for the image's class, all computed together. Writes
    ``gig/<a>__<b>/chunk_XXXXX.npz``: ``classes [n]`` (the classes with images in the chunk),
    ``class_sum [n, T, K_a]`` (Σ of GIG over each one's images), ``image [B]``,
    ``top_idx [B, M]``/``top_val [B, M, T]`` (each image's M strongest sources), ``delta [T, B]``
    and ``rel_delta [T, B]`` (``|delta| / |T(X(1)) − T(X(0))|``), ``steps [B]`` (the quadrature nodes
    each image used) and ``refined [B]`` (whether the adaptive refinement gave its result).
    """
    code_files = sorted((pipe.work / "codes").glob("chunk_*.npz"))
    for a, b in _bar(pipe, transitions(pipe), "stage 4: GIG"):
        _attribute_transition(pipe, a, b, code_files)
        dist.barrier()  # the next transition's targets are the class scores summed over all chunks


def _attribute_transition(pipe, a: str, b: str, code_files: list[Path]) -> None:
    """Stage 4 for one layer pair: every code chunk that is not done yet and belongs to this rank."""
    ca = load_concepts(pipe, a)
    V, beta = ca["V"].to(pipe.device), ca["beta"].to(pipe.device)
    targets = _class_targets(pipe, b)
    f_ab = pipe.adapter.f_ab(a, None if b == CLASSES else b)
    for ci, cpath in enumerate(code_files):
        path = trans_dir(pipe, a, b) / f"chunk_{ci:05d}.npz"
        if not dist.owns(ci) or is_complete(path, GIG_KEYS):
            continue
        with np.load(cpath, allow_pickle=False) as z:
            idx_all, val_all = torch.from_numpy(z[f"{a}|idx"]), torch.from_numpy(z[f"{a}|val"])
            images, groups = z["image"], z["label" if pipe.config.class_by == "label" else "prediction"]
        acc = _ChunkAttributions(images, groups, T=len(targets(int(groups[0]))) if len(groups) else 1,
                                 K=V.shape[0], M=min(max(IMAGE_CANDIDATES, pipe.config.top_concepts), V.shape[0]))
        for slot, c in enumerate(acc.classes):
            for sub in _batches(np.nonzero(groups == c)[0], pipe.config.batch_size):
                codes = (idx_all[sub].to(pipe.device), val_all[sub].to(pipe.device).to(V.dtype))
                res = gig(f_ab, codes, V, beta, targets(int(c)), spatial=pipe.spatial[a], **pipe.config.gig_options())
                acc.add(slot, sub, res, f"{a} → {b}")
        save_npz(path, **acc.arrays())


GIG_KEYS = ("classes", "class_sum", "image", "top_idx", "top_val", "delta", "rel_delta", "steps", "refined")


def _class_targets(pipe, b: str):
    """``class id → GIG target(s)`` of the transition into ``b``: the class itself (b = classes) or the
    class's top concepts of ``b`` (a list of :class:`~gig_fast.ConceptTarget`)."""
    if b == CLASSES:
        return lambda c: [ClassTarget(c, probability=pipe.config.class_probability)]
    tops = top_sets(pipe, b)
    Vb = load_concepts(pipe, b)["V"].to(pipe.device)
    return lambda c: [ConceptTarget(Vb[t]) for t in tops[c]]


class _ChunkAttributions:
    """The arrays of one stage-4 chunk file (see :func:`attribute`), filled batch by batch."""

    def __init__(self, images: np.ndarray, groups: np.ndarray, T: int, K: int, M: int):
        B = len(images)
        self.images, self.T, self.M = images, T, M
        # only the classes of this chunk: [n_classes, T, K] would be GBs for 1,000 classes
        self.classes = np.unique(groups)
        self.class_sum = np.zeros((len(self.classes), T, K), dtype=np.float64)
        self.top_idx = np.zeros((B, M), dtype=np.int64)
        self.top_val = np.zeros((B, M, T), dtype=np.float32)
        self.delta = np.zeros((T, B), dtype=np.float64)
        self.rel_delta = np.zeros((T, B), dtype=np.float64)
        self.steps = np.zeros(B, dtype=np.int64)
        self.refined = np.zeros(B, dtype=bool)

    def add(self, slot: int, rows: np.ndarray, res, where: str) -> None:
        """Store the :class:`~gig_fast.GIGResult` of the chunk rows ``rows`` (images of class ``classes[slot]``)."""
        T, n = self.T, len(rows)
        pc = res.per_concept.detach().double().cpu().reshape(T, n, -1)  # [T, n, K]
        if not torch.isfinite(pc).all():
            raise ValueError(f"non-finite GIG attributions for {where}")
        d = res.delta.detach().double().cpu().reshape(T, n)
        span = (res.value_at_input - res.value_at_baseline).detach().double().cpu().reshape(T, n)
        self.class_sum[slot] += pc.sum(1).numpy()
        order = torch.argsort(pc.abs().sum(0), dim=1, descending=True, stable=True)[:, :self.M]  # [n, M]
        self.top_idx[rows] = order.numpy()
        self.top_val[rows] = torch.gather(pc.permute(1, 2, 0), 1, order[:, :, None].expand(-1, -1, T)).numpy()
        self.delta[:, rows] = d.numpy()
        self.rel_delta[:, rows] = (d.abs() / span.abs().clamp_min(1e-12)).numpy()
        self.steps[rows], self.refined[rows] = res.steps.cpu().numpy(), res.refined.cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"classes": self.classes.astype(np.int64), "class_sum": self.class_sum, "image": self.images,
                "top_idx": self.top_idx, "top_val": self.top_val, "delta": self.delta, "rel_delta": self.rel_delta,
                "steps": self.steps, "refined": self.refined}
