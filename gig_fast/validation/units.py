"""The resumable units of a validation run and the fitted models they share, under
``work-<run key>/validation/``: each unit's JSON result (:class:`UnitStore`), the baselines fitted on the
stage-1 PFVs, the SAEs of the sparsity sweep and the k-means partitions of the K ablation (``models/``),
each computed once and loaded when the command runs again."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..ops.sparse_code import DEFAULT_LAM_REL
from ..pipeline.files import load_json, load_npz, save_json, save_npz
from .baselines import fit_dictionary_learning, fit_sae, load_decomposition, ours
from .options import ValidationOptions

__all__ = ["UnitStore", "our_decomposition", "baseline_fit", "sweep_sae", "kmeans_clusters"]


class UnitStore:
    """Atomic per-unit JSON results under ``<work>/validation/units/<group>-<key>/``; ``get`` computes
    missing ones. A unit name is ``<group>/<method or layer>/...``; its key hashes the group's options."""

    def __init__(self, root: Path, opts: ValidationOptions, run_key: str):
        self.root, self.opts, self.run_key = root, opts, run_key
        self.compute_s: dict[str, float] = {}  # per group: seconds the units took when computed

    def path(self, name: str) -> Path:
        group, rest = name.split("/", 1)
        key = self.opts.key(self.run_key, group)
        if group in ("c_deletion", "sparsity") and not rest.startswith("ours/"):
            key += "-" + self.opts.key(self.run_key, "baseline")
        return self.root / "units" / f"{group}-{key}" / f"{rest.replace('/', '__')}.json"

    def get(self, name: str, compute):
        p = self.path(name)
        if p.exists():
            res = load_json(p)
        else:
            t0 = time.perf_counter()
            res = compute()
            res["unit_seconds"] = round(time.perf_counter() - t0, 2)
            save_json(p, res)
        group = name.split("/", 1)[0]
        self.compute_s[group] = round(self.compute_s.get(group, 0.0) + res.get("unit_seconds", 0.0), 2)
        return res


def our_decomposition(pipe, point, lam=None):
    """The run's own concepts at ``point`` with its sparse coder (at the run's λ, or ``lam``)."""
    from ..pipeline.stages import load_concepts

    c = load_concepts(pipe, point)
    cfg = pipe.config
    return ours(c["V"].to(pipe.device), c["beta"].to(pipe.device), cfg.lam if lam is None else lam, cfg.code_method,
                cfg.positive)


def _train_pfvs(pipe, point: str, opts) -> torch.Tensor:
    from ..pipeline.stages import load_pfvs

    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"])
    if opts.baseline_train and len(X) > opts.baseline_train:
        X = X[np.random.default_rng(opts.seed).choice(len(X), opts.baseline_train, replace=False)]
    return X


def _saved(path: Path, name: str, fit):
    """Load the baseline saved at ``path`` (npz + its info JSON) or fit it with ``fit()`` and save it."""
    if path.exists():
        info = load_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
        return load_decomposition(name, load_npz(path), info)
    dec = fit()
    save_npz(path, **dec.state)
    save_json(path.with_suffix(".json"), dec.info)
    return dec


def baseline_fit(pipe, vwork: Path, name: str, point: str, opts):
    """Fit (or load the saved) baseline ``name`` at ``point`` on the stage-1 PFVs."""
    path = vwork / "models" / f"{name}-{opts.key(pipe.config.key(), 'baseline')}" / f"{point}.npz"

    def fit():
        X = _train_pfvs(pipe, point, opts)
        K = max(1, int(round(opts.baseline_k_factor * pipe.adapter.channels(point))))
        if name == "dictionary_learning":
            beta = our_decomposition(pipe, point).bias.float().cpu()  # the pipeline's β, as stage 2 used
            lam = pipe.config.lam if pipe.config.lam is not None else DEFAULT_LAM_REL
            return fit_dictionary_learning(X, beta, K, lam, opts.seed, opts.dl_iter)
        return fit_sae(X, K, opts.sae_lambda, opts.sae_steps, lr=opts.sae_lr, seed=opts.seed)
    return _saved(path, name, fit)


def sweep_sae(pipe, vwork: Path, point: str, lam: float, opts):
    """The SAE of the sparsity sweep at ``lam``: the baseline SAE itself at ``sae_lambda``, else one
    started from it and trained ``sae_sweep_steps`` more steps at ``lam``."""
    base = baseline_fit(pipe, vwork, "sae", point, opts)
    if float(lam) == float(opts.sae_lambda):
        return base
    key = opts.key(pipe.config.key(), "baseline") + "-" + opts.key(pipe.config.key(), "sparsity")
    path = vwork / "models" / f"sae-sweep-{key}" / f"{point}-lam{float(lam):g}.npz"
    return _saved(path, "sae", lambda: fit_sae(_train_pfvs(pipe, point, opts), base.V.shape[0], float(lam),
                                               opts.sae_sweep_steps, lr=opts.sae_lr, seed=opts.seed, init=base))


def kmeans_clusters(pipe, vwork: Path, point: str, K: int) -> dict:
    """Bisecting k-means with ``K`` clusters on the stage-1 PFVs (the pipeline's mode and seed):
    ``{"V": [K, C], "labels": [N], "beta": [C]}``; the pipeline's own concepts when K matches, else
    computed once and saved under the validation work folder."""
    from ..pipeline.distributed import bisecting_kmeans
    from ..pipeline.stages import load_concepts, load_pfvs

    stored = load_concepts(pipe, point)
    if stored["V"].shape[0] == K:
        return {k: stored[k] for k in ("V", "labels", "beta")}
    path = vwork / "models" / "clusters" / f"{point}-K{K}.npz"
    if path.exists():
        return {k: torch.from_numpy(v) for k, v in load_npz(path).items()}
    X = torch.from_numpy(load_pfvs(pipe, point)["pfv"]).to(pipe.device)
    if K > X.shape[0]:
        raise ValueError(f"K={K} > N={X.shape[0]} stage-1 PFVs at {point}")
    beta = stored["beta"].to(X)
    V, labels = bisecting_kmeans(X, K, beta, pipe.config.seed, pipe.config.kmeans_mode)
    out = {"V": V.detach().float().cpu(), "labels": labels.long().cpu(), "beta": beta.float().cpu()}
    save_npz(path, **out)
    return out
