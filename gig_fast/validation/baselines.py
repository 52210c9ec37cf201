"""Concept-extraction methods compared in the validation (paper §4.2, App. F), behind one interface.

Every method is a :class:`Decomposition`: a decoder ``x̂ = Σ_q u_q v_q + bias`` (``V [K, C]`` rows,
``bias [C]``) and an encoder ``X [N, C] → (idx [N, s], val [N, s])`` of padded sparse codes, so the
same metrics and the same GIG engine run on all of them.

* ``ours``: the pipeline's concepts (bisecting spherical k-means) and Lasso codes, bias β.
* ``dictionary_learning``: as the paper (§4 "Settings"): the dictionary is fitted with LARS and the PFVs
  are coded with Lasso-LARS — scikit-learn's ``DictionaryLearning(fit_algorithm="lars",
  transform_algorithm="lasso_lars")`` on ``x − β``, bias β, on more training PFVs than atoms (K < N,
  else the dictionary can simply memorise them). The batch algorithm, not the mini-batch one: on a
  planted problem (N = 400, C = 8, K = 10) 30 batch iterations reached an objective of 0.052 where 30
  mini-batch epochs of the same cost stopped at 0.067 (and never went below 0.067). Its λ (sklearn's ``alpha``, the λ of our objective
  ``½‖x − Dᵀu‖² + λ‖u‖₁``) is the pipeline's relative λ times the median ``‖D₀(x − β)‖_∞`` of the
  training PFVs, ``D₀`` the initial dictionary (random training PFVs).
* ``sae``: sparse autoencoder as Templeton et al. (2024) and its April-2024 training update, App. F
  Eq. 11: ``f = ReLU(W_e x + b_e)``, ``x̂ = W_d f + b_d``, ``L = mean ‖x − x̂‖² + λ Σ_i f_i ‖W_d,i‖``;
  inputs scaled by one constant so that E‖x‖ = √C; ``W_d`` columns random directions of norm 0.1,
  ``W_e = W_dᵀ``, ``b_e = b_d = 0``; Adam, gradient norm clipped at 1, λ warmed up linearly over the
  first 5 % of the steps and the learning rate decayed linearly to 0 over the last 20 %. Its loss curve
  and a convergence check (relative change of the loss between the last two tenths of the
  constant-rate phase) are kept in :attr:`Decomposition.info`.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..ops import sparse_code
from ..ops.sparse_code import SparseCodeConvergenceWarning
from .metrics import dense_to_padded

__all__ = ["Decomposition", "ours", "fit_dictionary_learning", "dictionary_learning_codes", "fit_sae",
           "load_decomposition", "dictionary_objective", "sae_schedule", "METHODS"]

METHODS = ("ours", "dictionary_learning", "sae")
SAE_INIT_NORM = 0.1  # decoder column norm at initialisation (Templeton et al.: 0.05–1)
SAE_WARMUP = 0.05  # share of the steps over which λ rises linearly from 0
SAE_DECAY = 0.2  # share of the steps, at the end, over which the learning rate falls linearly to 0


@dataclass
class Decomposition:
    """A concept decomposition: ``V [K, C]``, ``bias [C]`` and ``encode(X [N, C]) → (idx, val)``."""
    name: str
    V: torch.Tensor
    bias: torch.Tensor
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    state: dict  # arrays that rebuild it (saved as npz)
    info: dict = field(default_factory=dict)  # how it was fitted (JSON-able: sizes, λ, loss curve, seconds)


def ours(V: torch.Tensor, beta: torch.Tensor, lam, method: str = "lasso", positive: bool = False) -> Decomposition:
    """The pipeline's decomposition: Lasso codes on ``V [K, C]`` with bias ``beta [C]`` (stage 3's coder;
    like stage 3, rows stopped at the iteration cap are not warned about one call at a time — stage 3
    counts them per layer in metrics.json)."""
    def encode(X):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SparseCodeConvergenceWarning)
            return sparse_code(X, V, lam=lam, method=method, bias=beta, positive=positive)
    return Decomposition("ours", V, beta, encode, {"V": V, "beta": beta}, {"lam_rel": lam})


@contextlib.contextmanager
def _quiet_sklearn():
    """LARS on many near-collinear atoms emits a ConvergenceWarning per degenerate step (thousands per
    layer); they do not change the result's meaning, so they are silenced here."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def dictionary_learning_codes(D: np.ndarray, beta: torch.Tensor, alpha: float, info: dict | None = None) -> Decomposition:
    """The dictionary-learning decomposition with atoms ``D [K, C]`` (unit rows), bias ``beta [C]``:
    Lasso-LARS codes of ``x − β`` with λ = ``alpha`` (our objective's units)."""
    from sklearn.decomposition import sparse_encode

    V = torch.from_numpy(np.ascontiguousarray(D, dtype=np.float32))
    D64 = np.asarray(D, dtype=np.float64)

    def encode(X):
        with _quiet_sklearn():
            U = sparse_encode((X - beta.to(X)).double().cpu().numpy(), D64, algorithm="lasso_lars",
                              alpha=alpha, n_jobs=1)
        return dense_to_padded(torch.from_numpy(U).float())
    return Decomposition("dictionary_learning", V, beta.float(), encode,
                         {"D": D, "beta": beta, "alpha": np.array(alpha)}, dict(info or {}, alpha=float(alpha)))


def dictionary_objective(Xc: np.ndarray, D: np.ndarray, U: np.ndarray, alpha: float) -> float:
    """Dictionary learning's objective per row: ``mean_n ½‖x_n − Dᵀu_n‖² + α‖u_n‖₁`` for centred rows
    ``Xc [N, C]``, atoms ``D [K, C]`` and codes ``U [N, K]``."""
    R = Xc - U @ D
    return float((0.5 * (R * R).sum(1) + alpha * np.abs(U).sum(1)).mean())


def fit_dictionary_learning(X: torch.Tensor, beta: torch.Tensor, K: int, lam_rel: float, seed: int = 0,
                            max_iter: int = 20, fit_algorithm: str = "lars", tol: float = 1e-8,
                            init: str = "samples") -> Decomposition:
    """Dictionary learning baseline on ``X [N, C]`` centred by ``beta [C]``: ``K`` unit atoms, LARS.

    scikit-learn's batch ``DictionaryLearning`` (every iteration codes all rows with LARS, then updates
    every atom): at most ``max_iter`` iterations, or fewer when the objective changes by less than
    ``tol`` (its test). ``init``: ``"samples"`` starts from ``K`` random training rows ``D₀`` (unit
    norm), ``"svd"`` from scikit-learn's default (the C principal directions, the other atoms zero).
    ``alpha`` (fit and transform) = ``lam_rel`` × median over rows of ``‖D₀(x − β)‖_∞``: the pipeline's
    relative λ at a typical row. ``info["objective"]``: the objective ½‖X − UD‖² + α‖U‖₁ per row after
    each iteration. Raises ``ValueError`` unless ``K < N``.
    """
    from sklearn.decomposition import DictionaryLearning

    N = X.shape[0]
    if K >= N:
        raise ValueError(f"dictionary learning needs more training PFVs than atoms: K={K} ≥ N={N} "
                         "(raise baseline_train / the pipeline's concept_images, or lower baseline_k_factor)")
    if init not in ("samples", "svd"):
        raise ValueError(f"init must be 'samples' or 'svd', got {init!r}")
    t0 = time.perf_counter()
    Xc = (X - beta).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    D0 = Xc[rng.choice(N, size=K, replace=False)]
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True).clip(1e-12)
    alpha = float(lam_rel * np.median(np.abs(Xc @ D0.T).max(1)))
    # code_init is only its shape: the first iteration codes every row on dict_init before any update
    start = {"dict_init": D0, "code_init": np.zeros((N, K))} if init == "samples" else {}
    dl = DictionaryLearning(n_components=K, alpha=alpha, max_iter=max_iter, tol=tol, fit_algorithm=fit_algorithm,
                            transform_algorithm="lasso_lars", transform_alpha=alpha, random_state=seed, n_jobs=1, **start)
    with _quiet_sklearn():
        dl.fit(Xc)
    info = {"train_vectors": int(N), "K": int(K), "fit_algorithm": fit_algorithm, "init": init, "lam_rel": float(lam_rel),
            "iterations": int(dl.n_iter_), "max_iterations": int(max_iter),
            "objective": [round(float(e) / N, 6) for e in dl.error_], "fit_seconds": round(time.perf_counter() - t0, 2)}
    return dictionary_learning_codes(dl.components_, beta, alpha, info)


def _sae(We, be, Wd, bd, scale, info=None) -> Decomposition:
    V = (Wd.T / scale).float().contiguous()  # rows = decoder columns, in the raw PFV scale
    bias = (bd / scale).float()

    def encode(X):
        with torch.no_grad():
            f = torch.relu((X.float() * scale) @ We.T + be)
        return dense_to_padded(f)
    return Decomposition("sae", V, bias, encode, {"We": We, "be": be, "Wd": Wd, "bd": bd, "scale": np.array(scale)},
                         dict(info or {}))


def sae_schedule(step: int, steps: int) -> tuple[float, float]:
    """``(λ factor, learning-rate factor)`` at ``step`` of ``steps`` (Templeton et al. 2024's update):
    λ rises linearly over the first :data:`SAE_WARMUP` of the steps, the rate falls linearly to 0 over
    the last :data:`SAE_DECAY`."""
    warm = max(1, int(round(SAE_WARMUP * steps)))
    decay_start = int(round((1 - SAE_DECAY) * steps))
    lam_f = min(1.0, (step + 1) / warm)
    lr_f = 1.0 if step < decay_start else max(0.0, (steps - step) / max(1, steps - decay_start))
    return lam_f, lr_f


def fit_sae(X: torch.Tensor, K: int, lam: float = 5.0, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0, log_every: int | None = None, init: Decomposition | None = None) -> Decomposition:
    """Sparse autoencoder on ``X [N, C]`` with the loss of App. F (Eq. 11), ``K`` hidden units.

    Training as Templeton et al. (2024) (module docstring); ``steps`` mini-batches of ``batch_size``.
    ``init``: an SAE fitted on the same ``X`` to start from (a sparsity sweep: each λ continues from a
    trained neighbour, which converges in fewer steps than from scratch); λ then needs no warm-up.
    ``info`` holds the loss curve (mean over each ``log_every`` steps of the total loss, its squared
    error and its weighted-L1 parts, at full λ), the dead units (never active on the training PFVs) and
    ``converged_rel_change``: |relative change| of the logged loss between the last two tenths of the
    constant-rate phase (after the λ warm-up, before the decay) — small when the loss has flattened.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    X = X.float().cpu()
    N, C = X.shape
    scale = float(np.sqrt(C) / X.norm(dim=1).mean().clamp_min(1e-12))
    Xs = X * scale
    if init is not None:
        if init.name != "sae" or tuple(init.state["Wd"].shape) != (C, K):
            raise ValueError(f"init must be an SAE with {K} units on {C} channels")
        if not np.isclose(float(init.state["scale"]), scale, rtol=1e-6):
            raise ValueError("init was fitted on other PFVs (its input scale differs)")
        We, be, Wd, bd = (torch.as_tensor(init.state[k]).float().clone().requires_grad_() for k in ("We", "be", "Wd", "bd"))
    else:
        Wd = torch.randn(C, K, generator=g)
        Wd = (Wd / Wd.norm(dim=0, keepdim=True) * SAE_INIT_NORM).requires_grad_()
        We = Wd.detach().T.clone().requires_grad_()
        be = torch.zeros(K, requires_grad=True)
        bd = torch.zeros(C, requires_grad=True)
    params = [We, be, Wd, bd]
    opt = torch.optim.Adam(params, lr=lr)
    log_every = log_every or max(1, steps // 50)
    curve: dict[str, list] = {"step": [], "loss": [], "mse": [], "l1": []}
    acc = np.zeros(3)
    for step in range(steps):
        lam_f, lr_f = sae_schedule(step, steps)
        lam_f = 1.0 if init is not None else lam_f
        for group in opt.param_groups:
            group["lr"] = lr * lr_f
        xb = Xs[torch.randint(N, (min(batch_size, N),), generator=g)]
        f = torch.relu(xb @ We.T + be)
        xh = f @ Wd.T + bd
        mse = ((xb - xh) ** 2).sum(1).mean()
        l1 = (f * Wd.norm(dim=0)).sum(1).mean()
        loss = mse + lam * lam_f * l1
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc += [(mse + lam * l1).item(), mse.item(), l1.item()]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            for k, v in zip(("loss", "mse", "l1"), acc / n):
                curve[k].append(round(float(v), 6))
            curve["step"].append(step + 1)
            acc[:] = 0
    with torch.no_grad():
        dead = int(((torch.relu(Xs @ We.T + be) > 0).sum(0) == 0).sum())
    info = {"train_vectors": int(N), "K": int(K), "lambda": float(lam), "steps": int(steps), "lr": float(lr),
            "batch_size": int(batch_size), "loss_curve": curve, "dead_units": dead,
            "converged_rel_change": _plateau_change(curve, steps, warm=init is None),
            "started_from_lambda": None if init is None else init.info.get("lambda"),
            "fit_seconds": round(time.perf_counter() - t0, 2)}
    return _sae(We.detach(), be.detach(), Wd.detach(), bd.detach(), scale, info)


def _plateau_change(curve: dict, steps: int, warm: bool = True) -> float | None:
    """|relative change| of the logged loss between the last two tenths of the constant-rate phase (after the
    λ warm-up, before the rate decay), each averaged over its logged points: ~0 once the loss is flat."""
    s = np.asarray(curve["step"])
    y = np.asarray(curve["loss"])
    lo, hi = (SAE_WARMUP * steps if warm else 0), (1 - SAE_DECAY) * steps
    sel = np.nonzero((s > lo) & (s <= hi))[0]
    w = len(sel) // 10
    if w < 1:
        return None
    a, b = y[sel[-2 * w:-w]].mean(), y[sel[-w:]].mean()
    return float(abs(b - a) / max(abs(a), 1e-12))


def load_decomposition(name: str, state: dict, info: dict | None = None) -> Decomposition:
    """Rebuild a saved baseline from its npz ``state`` (see :attr:`Decomposition.state`) and its ``info``."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    if name == "dictionary_learning":
        return dictionary_learning_codes(np.asarray(state["D"]), t["beta"].float(), float(state["alpha"]), info)
    if name == "sae":
        return _sae(t["We"], t["be"], t["Wd"], t["bd"], float(state["scale"]), info)
    raise ValueError(f"unknown baseline {name!r}; valid: dictionary_learning, sae")
