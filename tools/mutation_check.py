"""A small mutation check: inject realistic bugs one at a time and see which tests catch them.

Each mutant replaces one snippet of the source (Python, Triton or C++) with a plausible mistake — the
kind a refactor or a "quick fix" introduces — and runs the test selection that should catch it. A mutant
is *killed* when those tests fail, *survived* when they pass (a hole in the suite). The working tree is
never touched: the tree is copied once to ``.mutation/tree`` (git-ignored, kept between runs so the C++
extension rebuilds incrementally), each mutant is applied there, tested, and reverted.

    python tools/mutation_check.py                 # every mutant (C++ ones rebuild the CPU extension)
    python tools/mutation_check.py --list          # the mutants and their test selections
    python tools/mutation_check.py --only sr_cpp_stops_at_padding gl_weights_uniform
    python tools/mutation_check.py --markdown docs/mutation.md   # write the result table

Exit status 1 when any mutant survives. The last result is kept in ``docs/mutation.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutation"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # file relative to the repository root
    find: str          # the snippet, which must occur exactly once
    replace: str       # the bug
    tests: tuple       # pytest arguments (run from the copy's root)
    what: str          # the bug in words


MUTANTS = [
    Mutant("concepts_no_beta", "gig_fast/concepts/bisecting.py",
           "Xc = X.to(acc) - (beta.to(acc) if beta is not None else 0)", "Xc = X.to(acc)",
           ("tests/test_concepts.py",), "concept extraction forgets to subtract β"),
    Mutant("gl_weights_uniform", "gig_fast/gig.py",
           "nodes, weights = 0.5 * (x + 1.0), 0.5 * w", "nodes, weights = 0.5 * (x + 1.0), np.full(m, 1.0 / m)",
           ("tests/test_gig.py", "-k", "not captum"), "Gauss–Legendre weights replaced by 1/m (caught without Captum)"),
    Mutant("gig_sign_flipped", "gig_fast/ops/gig_accumulate.py",
           "    return IMPLS[backend](grads, weights, idx, val, V)\n",
           "    return -IMPLS[backend](grads, weights, idx, val, V)\n",
           ("tests/test_pipeline_values.py",), "GIG's sign flipped on every backend (caught by a pipeline test)"),
    Mutant("sr_cpp_stops_at_padding", "csrc/sparse_reconstruct/sparse_reconstruct_cpu.cpp",
           "if (k < 0 || w == acc(0)) continue;", "if (k < 0) break;\n      if (w == acc(0)) continue;",
           ("tests/test_sparse_reconstruct.py",), "the cpp forward stops at the first −1 instead of skipping it"),
    Mutant("stage4_path_without_beta", "gig_fast/pipeline/stages.py",
           "res = gig(f_ab, codes, V, beta, targets(int(c))", "res = gig(f_ab, codes, V, 0 * beta, targets(int(c))",
           ("tests/test_pipeline_values.py",), "stage 4 builds the GIG path without β"),
    Mutant("triton_rescore_ignored", "gig_fast/kernels/spherical_assign.py",
           "take2 = (s2 > s1) | ((s2 == s1) & (k2 < k1))", "take2 = s2 != s2",
           ("tests/test_spherical_assign.py", "-k", "triton"), "the Triton assignment keeps its bf16 choice"),
    Mutant("gig_accumulate_bf16_sum", "gig_fast/ops/reference.py",
           'g = torch.einsum("m,...mpc->...pc", weights.to(acc), grads.to(acc))  # [(T,) P, C]',
           'g = torch.einsum("m,...mpc->...pc", weights.to(grads.dtype), grads).to(acc)  # [(T,) P, C]',
           ("tests/test_gig_accumulate.py",), "the α-sum accumulated in the gradients' half precision"),
    Mutant("lambda_max_signed", "gig_fast/ops/sparse_code.py",
           "lam_max = c.amax(1).clamp_min(0) if positive else c.abs().amax(1)",
           "lam_max = c.amax(1).clamp_min(0) if positive else c.amax(1)",
           ("tests/test_sparse_code.py",), "λ_max taken over signed correlations"),
    Mutant("two_means_ties_to_one", "csrc/two_means/two_means_cpu.cpp",
           "const int64_t s = dot(x, w, C) > 0 ? 1 : 0;", "const int64_t s = dot(x, w, C) >= 0 ? 1 : 0;",
           ("tests/test_two_means.py",), "the cpp 2-means sends rows on the hyperplane (and zero rows) to side 1"),
    Mutant("assign_ties_to_larger", "csrc/spherical_assign/spherical_assign_cpu.cpp",
           "if (si[j] > top) {", "if (si[j] >= top) {",
           ("tests/test_spherical_assign.py", "-k", "cpp"), "cpp assignment ties go to the larger index"),
    Mutant("gig_endpoints_swapped", "gig_fast/gig.py",
           "return attr, ends[:, 0], ends[:, 1]", "return attr, ends[:, 1], ends[:, 0]",
           ("tests/test_gig.py", "-k", "not captum"), "T(X(1)) and T(X(0)) swapped in the completeness delta"),
    Mutant("centroid_update_drops_last_row", "gig_fast/ops/reference.py",
           "return segment_sum(X.to(acc), labels, K), torch.bincount(labels, minlength=K)",
           "return segment_sum(X[:-1].to(acc), labels[:-1], K), torch.bincount(labels, minlength=K)",
           ("tests/test_centroid_update.py",), "the reference update forgets the last point"),
]


def _copy_tree(dest: Path) -> None:
    """The tracked and untracked (not ignored) files of the working tree, plus the built extensions."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_symlink():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_bytes() != src.read_bytes():
                shutil.copy2(src, target)
    for so in (ROOT / "gig_fast").glob("*.so"):
        if not (dest / "gig_fast" / so.name).exists():
            shutil.copy2(so, dest / "gig_fast" / so.name)


def _build(tree: Path) -> None:
    """Rebuild the CPU extension in the copy (incremental: only the changed source recompiles)."""
    env = dict(os.environ, GIG_FAST_SKIP_CUDA="1")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env, check=True,
                   capture_output=True)


def _run_tests(tree: Path, tests: tuple, timeout: int) -> tuple[str, float]:
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    status = {0: "survived", 1: "killed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return status, time.time() - t0


def check(mutants: list[Mutant], timeout: int) -> list[tuple[Mutant, str, float]]:
    tree = SCRATCH / "tree"
    _copy_tree(tree)
    results = []
    for m in mutants:
        path = tree / m.path
        original = path.read_text(encoding="utf-8")
        if original.count(m.find) != 1:
            results.append((m, f"stale: the snippet occurs {original.count(m.find)} times", 0.0))
            continue
        cpp = m.path.startswith("csrc/")
        try:
            path.write_text(original.replace(m.find, m.replace), encoding="utf-8")
            if cpp:
                _build(tree)
            status, seconds = _run_tests(tree, m.tests, timeout)
        finally:
            path.write_text(original, encoding="utf-8")
            if cpp:
                _build(tree)
        results.append((m, status, seconds))
        print(f"{m.name:32s} {status:10s} {seconds:6.1f} s  {m.what}", flush=True)
    return results


def markdown(results) -> str:
    rows = "\n".join(f"| `{m.name}` | {m.what} | `{m.path}` | `{' '.join(m.tests)}` | **{status}** | {s:.0f} |"
                     for m, status, s in results)
    killed = sum(1 for _, status, _ in results if status == "killed")
    return (f"# Mutation check\n\n`python tools/mutation_check.py` injects each bug below into a copy of the tree and "
            f"runs the tests named beside it (the op's own test file for op bugs). Last run: "
            f"{time.strftime('%Y-%m-%d')}, {killed} of {len(results)} mutants killed.\n\n"
            "| mutant | the bug | file | tests | result | seconds |\n|---|---|---|---|---|---|\n" + rows + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutant's test run")
    ap.add_argument("--markdown", help="write the result table to this file")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        ap.error(f"unknown mutant(s); known: {[m.name for m in MUTANTS]}")
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path}  [{' '.join(m.tests)}]  {m.what}")
        return 0
    results = check(chosen, args.timeout)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results), encoding="utf-8")
    return 0 if all(status == "killed" for _, status, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
