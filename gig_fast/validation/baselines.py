"""Concept-extraction methods compared in the validation (paper §4.2, App. F), behind one interface.

Every method is a :class:`Decomposition`: a decoder ``x̂ = Σ_q u_q v_q + bias`` (``V [K, C]`` rows,
``bias [C]``) and an encoder ``X [N, C] → (idx [N, s], val [N, s])`` of padded sparse codes, so the
same metrics and the same GIG engine run on all of them.

* ``ours``: the pipeline's concepts (bisecting spherical k-means) and Lasso codes, bias β.
* ``dictionary_learning``: scikit-learn ``MiniBatchDictionaryLearning`` on ``x − β`` (coordinate-descent
  fitting by default — LARS fitting is ~10× slower at K = 2048 on 2 cores —, ``lasso_lars`` coding), bias β; its λ is the pipeline's relative λ times the median ``‖D(x − β)‖_∞``
  of the training PFVs (sklearn's ``lasso_lars`` takes one absolute λ in our objective's units).
* ``sae``: sparse autoencoder ``f = ReLU(W_e x + b_e)``, ``x̂ = W_d f + b_d`` trained with Eq. 11,
  ``L = mean ‖x − x̂‖² + λ Σ_i f_i ‖W_d,i‖`` (Templeton et al. 2024: inputs scaled so that
  E‖x‖ = √C, Adam); bias ``b_d``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..ops import sparse_code
from .metrics import dense_to_padded

__all__ = ["Decomposition", "ours", "fit_dictionary_learning", "fit_sae", "load_decomposition", "METHODS"]

METHODS = ("ours", "dictionary_learning", "sae")


@dataclass
class Decomposition:
    """A concept decomposition: ``V [K, C]``, ``bias [C]`` and ``encode(X [N, C]) → (idx, val)``."""
    name: str
    V: torch.Tensor
    bias: torch.Tensor
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    state: dict  # arrays that rebuild it (saved as npz)


def ours(V: torch.Tensor, beta: torch.Tensor, lam, method: str = "lasso", positive: bool = False) -> Decomposition:
    """The pipeline's decomposition: Lasso codes on ``V [K, C]`` with bias ``beta [C]`` (stage 3's coder)."""
    def encode(X):
        return sparse_code(X, V, lam=lam, method=method, bias=beta, positive=positive)
    return Decomposition("ours", V, beta, encode, {"V": V, "beta": beta})


@contextlib.contextmanager
def _quiet_sklearn():
    """LARS on many near-collinear atoms emits a ConvergenceWarning per degenerate step (thousands per
    layer); they do not change the result's meaning, so they are silenced here."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _dl(D: np.ndarray, beta: torch.Tensor, alpha: float) -> Decomposition:
    from sklearn.decomposition import sparse_encode

    V = torch.from_numpy(np.ascontiguousarray(D, dtype=np.float32))

    def encode(X):
        with _quiet_sklearn():
            U = sparse_encode((X - beta).double().cpu().numpy(), D.astype(np.float64), algorithm="lasso_lars",
                              alpha=alpha, n_jobs=1)
        return dense_to_padded(torch.from_numpy(U).float())
    return Decomposition("dictionary_learning", V, beta.float(), encode,
                         {"D": D, "beta": beta, "alpha": np.array(alpha)})


def fit_dictionary_learning(X: torch.Tensor, beta: torch.Tensor, K: int, lam_rel: float, seed: int = 0,
                            max_iter: int = 10, batch_size: int = 256, fit_algorithm: str = "cd") -> Decomposition:
    """Dictionary learning baseline on ``X [N, C]`` centred by ``beta [C]``: ``K`` unit atoms, LARS.

    ``alpha`` (fit and transform) = ``lam_rel`` × median over rows of ``‖D₀(x − β)‖_∞`` with ``D₀`` the
    random-sample initial dictionary, i.e. the pipeline's relative λ at a typical row.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning

    Xc = (X - beta).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    D0 = Xc[rng.choice(len(Xc), size=K, replace=len(Xc) < K)]
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True).clip(1e-12)
    alpha = float(lam_rel * np.median(np.abs(Xc @ D0.T).max(1)))
    dl = MiniBatchDictionaryLearning(n_components=K, alpha=alpha, batch_size=batch_size, max_iter=max_iter,
                                     fit_algorithm=fit_algorithm, transform_algorithm="lasso_lars", transform_alpha=alpha,
                                     dict_init=D0, random_state=seed)
    with _quiet_sklearn():
        dl.fit(Xc)
    return _dl(dl.components_, beta, alpha)


def _sae(We, be, Wd, bd, scale) -> Decomposition:
    V = (Wd.T / scale).float().contiguous()  # rows = decoder columns, in the raw PFV scale
    bias = (bd / scale).float()

    def encode(X):
        with torch.no_grad():
            f = torch.relu((X.float() * scale) @ We.T + be)
        return dense_to_padded(f)
    return Decomposition("sae", V, bias, encode, {"We": We, "be": be, "Wd": Wd, "bd": bd, "scale": np.array(scale)})


def fit_sae(X: torch.Tensor, K: int, lam: float = 5.0, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0) -> Decomposition:
    """Sparse autoencoder on ``X [N, C]`` with the loss of App. F (Eq. 11), ``K`` hidden units.

    Inputs are scaled by ``√C / mean ‖x‖``; ``W_d`` columns start at norm 0.1, ``W_e = W_dᵀ``,
    ``b_d`` = the data mean, ``b_e = 0``; Adam for ``steps`` mini-batches.
    """
    g = torch.Generator().manual_seed(seed)
    X = X.float().cpu()
    N, C = X.shape
    scale = float(np.sqrt(C) / X.norm(dim=1).mean().clamp_min(1e-12))
    Xs = X * scale
    Wd = torch.randn(C, K, generator=g)
    Wd = (Wd / Wd.norm(dim=0, keepdim=True) * 0.1).requires_grad_()
    We = Wd.detach().T.clone().requires_grad_()
    be = torch.zeros(K, requires_grad=True)
    bd = Xs.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([We, be, Wd, bd], lr=lr)
    for _ in range(steps):
        xb = Xs[torch.randint(N, (min(batch_size, N),), generator=g)]
        f = torch.relu(xb @ We.T + be)
        xh = f @ Wd.T + bd
        loss = ((xb - xh) ** 2).sum(1).mean() + lam * (f * Wd.norm(dim=0)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _sae(We.detach(), be.detach(), Wd.detach(), bd.detach(), scale)


def load_decomposition(name: str, state: dict) -> Decomposition:
    """Rebuild a saved baseline from its npz ``state`` (see :attr:`Decomposition.state`)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    if name == "dictionary_learning":
        return _dl(np.asarray(state["D"]), t["beta"].float(), float(state["alpha"]))
    if name == "sae":
        return _sae(t["We"], t["be"], t["Wd"], t["bd"], float(state["scale"]))
    raise ValueError(f"unknown baseline {name!r}; valid: dictionary_learning, sae")
