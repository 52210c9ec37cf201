"""The four stages of a GIG run (docs/design.md §1.2–1.5), each resumable per layer / per chunk of images,
and the readers of their files. Which concepts and class pairs stage 4 attributes to (the graph
selection) is :mod:`.selection`.

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
from ..run_folder import CODES, STAGE1, chunk_file, chunk_files, concept_file
from ..srd import explain
from . import distributed as dist
from .image_loader import image_batches
from .selection import CLASSES, image_top_concepts, layer_above, trans_dir, transitions, view_sets
from .files import BackgroundWriter, is_complete, load_npz, save_npz

__all__ = ["pfv_dataset", "extract_concepts", "decompose", "attribute", "chunk_ids", "concept_bank", "load_pfvs",
           "load_concepts", "n_concepts"]

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


def _image_chunks(pipe, ids, folder: str, keys):
    """The chunks of a per-image stage (1 or 3): ``(chunks [image ids per chunk], files, todo, loaded)`` —
    ``todo`` this rank's chunks not done yet (another rank's chunk, or a finished one on resume, is
    skipped), ``loaded`` the iterator of their image batches, loaded ahead (:func:`image_batches`)."""
    chunks = chunk_ids(ids, pipe.config.chunk_images)
    files = [chunk_file(pipe.work / folder, ci) for ci in range(len(chunks))]
    todo = [ci for ci in range(len(chunks)) if dist.owns(ci) and not is_complete(files[ci], keys)]
    loaded = image_batches(pipe, [b for ci in todo for b in _batches(chunks[ci], pipe.config.batch_size)])
    return chunks, files, todo, loaded


def pfv_dataset(pipe) -> list[Path]:
    """Stage 1: for each concept image and analysed layer, sample ``pfvs_per_image`` PFVs by their
    contribution to the class logit and keep each with its iERF (docs/design.md §1.2).

    Writes ``stage1/chunk_XXXXX.npz`` with, per layer ``L``: ``L|pfv [n, C]`` float32,
    ``L|ierf [n, H_in, W_in]`` (``ierf_dtype``; only with ``store_ierf``), ``L|position [n]``, and ``image [n]``, ``label [n]``,
    ``target [n]`` (the explained class). Returns the chunk files in order.
    """
    cfg = pipe.config
    chunks, files, todo, loaded = _image_chunks(pipe, pipe.concept_ids, STAGE1, _stage1_keys(pipe))
    with BackgroundWriter(save_npz) as writer:  # the next chunk computes while this one is written
        for ci in _bar(pipe, todo, "stage 1: PFV–iERF dataset"):
            chunk, path = chunks[ci], files[ci]
            k = cfg.pfvs_per_image
            parts: dict[str, list] = {}
            for batch in _batches(chunk, cfg.batch_size):
                x, y = next(loaded)
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
            writer.save_npz(path, **{key: torch.cat(v) for key, v in parts.items()})
    dist.barrier()  # stage 2 reads every rank's chunks
    return files


def _stage1_keys(pipe) -> list[str]:
    """The arrays a stage-1 chunk must hold (what the later stages read)."""
    return ["image", "label"] + [f"{p}|{key}" for p in pipe.points for key in ("pfv", "position")]


def load_pfvs(pipe, point: str) -> dict[str, np.ndarray]:
    """The stage-1 samples of one layer: ``pfv [N, C]``, ``position``, ``image``, ``label`` (no iERFs)."""
    out: dict[str, list] = {}
    for ci in range(len(chunk_ids(pipe.concept_ids, pipe.config.chunk_images))):
        with np.load(chunk_file(pipe.work / STAGE1, ci), allow_pickle=False) as z:
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
    """Stage 2: bisecting spherical k-means per layer (docs/design.md §1.3) on the stage-1 PFVs.

    Writes ``concepts/<layer>.npz``: ``V [K, C]`` (concept vectors = cluster means of ``x − β``),
    ``beta [C]`` (``adapter.baseline``: the BN shift, or the mean of the PFVs where no BN feeds the
    point: transformers, ConvNeXt), ``labels [N]``, ``sizes [K]``, ``representatives [K, r]`` (stage-1 row indices of the
    members closest in cosine, −1 padded) and ``rep_cosine [K, r]``.
    """
    cfg, files = pipe.config, {}
    for point in _bar(pipe, pipe.points, "stage 2: concepts"):
        path = concept_file(pipe.work, point)
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
    path = concept_file(pipe.work, point)
    d = {k: torch.from_numpy(v) for k, v in load_npz(path).items()}
    try:
        check_finite(V=d.get("V"), beta=d.get("beta"))
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {e}; delete it to compute the concepts again") from None
    return d


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
    """Stage 3: code every PFV of the explained images on its layer's concepts (docs/design.md §1.4).

    Writes ``codes/chunk_XXXXX.npz`` with ``image``, ``label``, ``prediction`` and, per layer ``L``:
    ``L|idx [B, P, s]`` int64 (−1 padded), ``L|val [B, P, s]`` float32, ``L|rel_l2_sum``,
    ``L|l0_sum``, ``L|count`` (for the per-layer rel-L2 and l0 ratio), ``L|not_converged`` (rows the
    coder stopped at its iteration cap).
    """
    cfg = pipe.config
    concepts = {p: load_concepts(pipe, p) for p in pipe.points}
    chunks, files, todo, loaded = _image_chunks(pipe, pipe.explain_ids, CODES, _code_keys(pipe))
    with BackgroundWriter(save_npz) as writer:  # the next chunk computes while this one is written
        for ci in _bar(pipe, todo, "stage 3: decomposition"):
            chunk, path = chunks[ci], files[ci]
            out: dict[str, list] = {}
            for batch in _batches(chunk, cfg.batch_size):
                x, y = next(loaded)
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
            writer.save_npz(path, **arrays)
    dist.barrier()  # stage 4 reads every rank's codes
    return files


# ---------------------------------------------------------------------------------------------
# stage 4: GIG
# ---------------------------------------------------------------------------------------------
def attribute(pipe) -> None:
    """Stage 4: GIG per explained image, top-down (docs/design.md §1.5–1.6).

    For (last layer → classes) the target is the image's class (``class_by``); for (a → b) the
    targets of a class's images are its :func:`view_sets` of ``b`` (its top concepts, then the concepts
    it shares with other classes). Each image also gets its own graph (paper Fig. 3): GIG to its own
    top concepts of ``b`` (those of the transition above), from which its own top concepts of ``a`` are
    chosen (:func:`image_top_concepts`) — what ``gig-fast explain`` computes. The three passes and
    their rules: :func:`_attribute_transition`.
    Writes ``gig/<a>__<b>/chunk_XXXXX.npz``: ``classes [n]`` (the classes with images in the chunk),
    ``targets [n, T]`` (their targets of b, −1 padded; the class id for b = classes), ``n_top`` (the
    first n_top targets are the top set), ``class_sum [n, T, K_a]`` (Σ of GIG over each one's images),
    ``image [B]``, ``own_targets [B, T_o]``, ``own_nodes [B, k]``, ``own_val [B, k, T_o]`` (each image's
    graph), ``delta [n_top, B]`` and ``rel_delta`` (``|delta| / |T(X(1)) − T(X(0))|``) of the top targets,
    ``shared_delta``/``shared_rel_delta [T − n_top, B]`` of the shared ones (NaN where the image's class
    has fewer), ``own_delta``/``own_rel_delta [T_o, B]``, ``steps [B]`` (the quadrature nodes each image
    used for its top targets) and ``refined [B]`` (whether the adaptive refinement gave that result).
    """
    code_files = chunk_files(pipe.work / CODES)
    for a, b in _bar(pipe, transitions(pipe), "stage 4: GIG"):
        _attribute_transition(pipe, a, b, code_files)
        dist.barrier()  # the next transition's targets are the class scores summed over all chunks


def _attribute_transition(pipe, a: str, b: str, code_files: list[Path]) -> None:
    """Stage 4 for one layer pair: every code chunk that is not done yet and belongs to this rank.

    Three GIG passes per chunk, with the configured rule (the adaptive one by default): (1) each
    image to its class's top concepts of b (or the class), all classes in one batch through per-image
    targets — the class graphs; (2) to the other concepts of its :func:`view_sets` (shared with another
    class) — the pair graphs' edges into shared concepts, per class (each class has its own number of
    them), with the fixed ``gig_shared_steps``-node rule (:meth:`PipelineConfig.shared_gig_options`);
    their completeness is reported apart; (3) each image to its own top concepts of b
    (:func:`image_top_concepts` of the transition above) — the image graphs, as ``explain``.
    """
    cfg = pipe.config
    ca = load_concepts(pipe, a)
    V, beta = ca["V"].to(pipe.device), ca["beta"].to(pipe.device)
    target_ids = view_sets(pipe, b) if b != CLASSES else np.arange(pipe.num_classes)[:, None]
    n_top = min(cfg.top_concepts, target_ids.shape[1]) if b != CLASSES else 1
    Vb = load_concepts(pipe, b)["V"].to(pipe.device) if b != CLASSES else None
    f_ab = pipe.adapter.f_ab(a, None if b == CLASSES else b)
    k = min(cfg.top_concepts, V.shape[0])
    with BackgroundWriter(save_npz) as writer:  # the next chunk computes while this one is written
        for ci, cpath in enumerate(code_files):
            path = chunk_file(trans_dir(pipe, a, b), ci)
            if not dist.owns(ci) or is_complete(path, GIG_KEYS):
                continue
            with np.load(cpath, allow_pickle=False) as z:
                idx_all, val_all = torch.from_numpy(z[f"{a}|idx"]), torch.from_numpy(z[f"{a}|val"])
                images, groups = z["image"], z["label" if cfg.class_by == "label" else "prediction"]
            acc = _ChunkAttributions(images, groups, target_ids, n_top, K=V.shape[0], k=k, own_is_class=b == CLASSES)
            codes_of = lambda rows: (idx_all[rows].to(pipe.device), val_all[rows].to(pipe.device).to(V.dtype))  # noqa: E731
            # (1) every image of the chunk at once, each to its own class's targets (per-image targets): per
            # class, a chunk of a 1,000-class run would be ~1 image per gig() call
            for sub in _batches(np.arange(len(images)), cfg.batch_size):
                res = gig(f_ab, codes_of(sub), V, beta, _class_targets(pipe, b, Vb, groups[sub], target_ids[:, :n_top]),
                          spatial=pipe.spatial[a], **cfg.gig_options())
                acc.add(sub, res, f"{a} → {b}")
            # (2) per class: each class has its own number of shared targets
            for slot, c in enumerate(acc.classes):
                extra = [int(t) for t in target_ids[c, n_top:] if t >= 0]
                for sub in _batches(np.nonzero(groups == c)[0], cfg.batch_size) if extra else ():
                    res = gig(f_ab, codes_of(sub), V, beta, _targets(pipe, b, Vb, c, extra), spatial=pipe.spatial[a],
                              **cfg.shared_gig_options())
                    acc.add_shared(slot, sub, res, f"{a} → {b} (shared concepts)")
            if b != CLASSES:  # an image's own targets are its own top concepts of b, chosen in the transition above
                with np.load(trans_dir(pipe, b, layer_above(pipe, b)) / cpath.name, allow_pickle=False) as z:
                    own_targets = z["own_nodes"]
                for sub in _batches(np.arange(len(images)), cfg.batch_size):
                    vectors = [ConceptTarget(Vb[torch.from_numpy(own_targets[sub, t]).to(pipe.device)])
                               for t in range(own_targets.shape[1])]
                    res = gig(f_ab, codes_of(sub), V, beta, vectors, spatial=pipe.spatial[a], **cfg.gig_options())
                    acc.add_own(sub, own_targets[sub], res, f"{a} → {b} (image graphs)")
            writer.save_npz(path, **acc.arrays())


# the arrays every finished chunk file holds (a damaged or partial file is recomputed)
GIG_KEYS = ("classes", "targets", "n_top", "class_sum", "image", "delta", "rel_delta", "shared_delta", "shared_rel_delta",
            "steps", "refined", "own_targets", "own_nodes", "own_val")


def _class_targets(pipe, b: str, Vb, classes: np.ndarray, tops: np.ndarray) -> list:
    """Per-image GIG targets of the class pass into ``b``: each image's class (``classes [n]``; b =
    classes), or the T concepts ``tops[class, t]`` of b (``tops [n_classes, T]``) of each image's class,
    one :class:`~gig_fast.ConceptTarget` of ``[n, C_b]`` vectors per t."""
    if b == CLASSES:
        return [ClassTarget(torch.as_tensor(classes, dtype=torch.int64, device=pipe.device),
                            probability=pipe.config.class_probability)]
    ids = torch.from_numpy(np.ascontiguousarray(tops[classes])).to(pipe.device)  # [n, T]
    return [ConceptTarget(Vb[ids[:, t]]) for t in range(ids.shape[1])]


def _targets(pipe, b: str, Vb, c: int, targets) -> list:
    """GIG targets of class ``c``'s images in the transition into ``b``: the class itself (b = classes)
    or :class:`~gig_fast.ConceptTarget` of the given concepts of ``b``."""
    if b == CLASSES:
        return [ClassTarget(int(c), probability=pipe.config.class_probability)]
    return [ConceptTarget(Vb[int(t)]) for t in targets]


class _ChunkAttributions:
    """The arrays of one stage-4 chunk file (see :func:`attribute`), filled batch by batch."""

    def __init__(self, images: np.ndarray, groups: np.ndarray, target_ids: np.ndarray, n_top: int, K: int, k: int,
                 own_is_class: bool):
        B, T = len(images), target_ids.shape[1]
        self.images, self.groups, self.k, self.n_top, self.own_is_class = images, groups, k, n_top, own_is_class
        # only the classes of this chunk: [n_classes, T, K] would be GBs for 1,000 classes
        self.classes = np.unique(groups)
        self.targets = target_ids[self.classes]
        self.class_sum = np.zeros((len(self.classes), T, K), dtype=np.float64)
        self.delta = np.zeros((n_top, B), dtype=np.float64)
        self.rel_delta = np.zeros((n_top, B), dtype=np.float64)
        self.shared_delta = np.full((T - n_top, B), np.nan)  # NaN: fewer shared targets for the image's class
        self.shared_rel_delta = np.full((T - n_top, B), np.nan)
        self.steps = np.zeros(B, dtype=np.int64)
        self.refined = np.zeros(B, dtype=bool)
        self.own_targets = self.own_nodes = self.own_val = self.own_delta = self.own_rel_delta = None

    @staticmethod
    def _finite(res, n: int, where: str):
        T = res.per_concept.shape[0]  # targets are always a list: [T, n, K]
        pc = res.per_concept.detach().double().cpu().reshape(T, n, -1)
        # one sum instead of an elementwise mask (the mask took 1.0 s of the demo's stage 4, 424 calls): a
        # NaN or inf makes it non-finite, and float32 attributions cannot overflow a float64 sum
        if not torch.isfinite(pc.sum()):
            raise ValueError(f"non-finite GIG attributions for {where}")
        d = res.delta.detach().double().cpu().reshape(T, n)
        span = (res.value_at_input - res.value_at_baseline).detach().double().cpu().reshape(T, n)
        return pc, d, d.abs() / span.abs().clamp_min(1e-12)

    def add(self, rows: np.ndarray, res, where: str) -> None:
        """The class pass of the chunk rows ``rows`` (images of any classes): each to its class's top targets."""
        pc, d, rel = self._finite(res, len(rows), where)
        slots = np.searchsorted(self.classes, self.groups[rows])  # classes is sorted (np.unique)
        np.add.at(self.class_sum, (slots, slice(0, self.n_top)), pc.permute(1, 0, 2).numpy())  # [n, T, K] per image
        self.delta[:, rows], self.rel_delta[:, rows] = d.numpy(), rel.numpy()
        self.steps[rows], self.refined[rows] = res.steps.cpu().numpy(), res.refined.cpu().numpy()
        if self.own_is_class:  # b = classes: the class pass is also each image's own graph
            self._own(len(self.images), 1)
            nodes, values = image_top_concepts(pc, self.k)
            self.own_targets[rows, 0], self.own_nodes[rows], self.own_val[rows] = \
                self.groups[rows], nodes.numpy(), values.numpy()

    def add_shared(self, slot: int, rows: np.ndarray, res, where: str) -> None:
        """The shared pass of the same rows: the class's other view-set targets (after its top ones)."""
        pc, d, rel = self._finite(res, len(rows), where)
        T = pc.shape[0]
        self.class_sum[slot, self.n_top:self.n_top + T] += pc.sum(1).numpy()
        self.shared_delta[:T, rows], self.shared_rel_delta[:T, rows] = d.numpy(), rel.numpy()

    def _own(self, B: int, T: int) -> None:
        if self.own_nodes is None:
            self.own_targets = np.zeros((B, T), dtype=np.int64)
            self.own_nodes = np.zeros((B, self.k), dtype=np.int64)
            self.own_val = np.zeros((B, self.k, T), dtype=np.float64)
            if not self.own_is_class:  # else the same numbers as delta / rel_delta
                self.own_delta, self.own_rel_delta = np.zeros((T, B)), np.zeros((T, B))

    def add_own(self, rows: np.ndarray, own_targets: np.ndarray, res, where: str) -> None:
        """The image-graph pass of rows ``rows``: GIG to each image's own targets ``[n, T_o]``."""
        pc, d, rel = self._finite(res, len(rows), where)
        self._own(len(self.images), own_targets.shape[1])
        nodes, values = image_top_concepts(pc, self.k)
        self.own_targets[rows], self.own_nodes[rows], self.own_val[rows] = own_targets, nodes.numpy(), values.numpy()
        self.own_delta[:, rows], self.own_rel_delta[:, rows] = d.numpy(), rel.numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"classes": self.classes.astype(np.int64), "targets": self.targets.astype(np.int64),
               "n_top": np.int64(self.n_top), "class_sum": self.class_sum, "image": self.images,
               "delta": self.delta, "rel_delta": self.rel_delta, "shared_delta": self.shared_delta,
               "shared_rel_delta": self.shared_rel_delta, "steps": self.steps, "refined": self.refined}
        if self.own_nodes is not None:
            out.update(own_targets=self.own_targets, own_nodes=self.own_nodes, own_val=self.own_val)
        if self.own_delta is not None:
            out.update(own_delta=self.own_delta, own_rel_delta=self.own_rel_delta)
        return out
