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
    python tools/mutation_check.py --baseline      # first check that the unmutated copy passes each selection
    python tools/mutation_check.py --changed-since origin/main --time-budget 240   # CI: a change's mutants

``--changed-since REF`` keeps the mutants whose file, or one of whose test files, differs from ``REF``
(committed or not): the check a change needs, in CI's time. ``--time-budget S`` starts no mutant after S
seconds (those left are listed as not run). A mutant of code that runs only on CPUs with some feature
(``needs``, e.g. an AVX-512 kernel) is listed as not run on a CPU without it, where no test can reach it.
Exit status 1 when any mutant survives (or the baseline fails). The last full result is kept in ``docs/mutation.md``.
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
    needs: str = ""    # a CPU flag the mutated code runs on (e.g. "avx512f"): elsewhere no test reaches it


MUTANTS = [
    Mutant("concepts_no_beta", "gig_fast/concepts/bisecting.py",
           "Xc = X.to(acc) - (beta.to(acc) if beta is not None else 0)", "Xc = X.to(acc)",
           ("tests/test_concepts.py",), "concept extraction forgets to subtract β"),
    Mutant("gl_weights_uniform", "gig_fast/gig/rules.py",
           "nodes, weights = 0.5 * (x + 1.0), 0.5 * w", "nodes, weights = 0.5 * (x + 1.0), np.full(m, 1.0 / m)",
           ("tests/test_gig.py", "-k", "not captum"), "Gauss–Legendre weights replaced by 1/m (caught without Captum)"),
    # gig() calls gig_accumulate's bare kernel (not the public op) since its host-overhead work: the sign is
    # flipped there, where every backend's result enters GIG
    Mutant("gig_sign_flipped", "gig_fast/gig/evaluation.py",
           "        return run.accumulate(grads.contiguous(), weights.contiguous(), idx.contiguous(), val.contiguous(), run.V)\n",
           "        return -run.accumulate(grads.contiguous(), weights.contiguous(), idx.contiguous(), val.contiguous(), run.V)\n",
           ("tests/test_pipeline_values.py",), "GIG's sign flipped on every backend (caught by a pipeline test)"),
    Mutant("sr_cpp_stops_at_padding", "csrc/sparse_reconstruct/sparse_reconstruct_cpu.cpp",
           "if (k < 0 || w == acc(0)) continue;", "if (k < 0) break;\n      if (w == acc(0)) continue;",
           ("tests/test_sparse_reconstruct.py",), "the cpp forward stops at the first −1 instead of skipping it"),
    Mutant("stage4_path_without_beta", "gig_fast/pipeline/stages.py",
           "res = gig(f_ab, codes_of(sub), V, beta, _class_targets(", "res = gig(f_ab, codes_of(sub), V, 0 * beta, _class_targets(",
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
    Mutant("fused_assign_ties_to_larger", "csrc/spherical_assign/fused_argmax_avx2.h",
           "__m256 gt = _mm256_cmp_ps(v, cur, _CMP_GT_OQ);", "__m256 gt = _mm256_cmp_ps(v, cur, _CMP_GE_OQ);",
           ("tests/test_spherical_assign.py", "-k", "cpp"), "the fused AVX2 assignment's ties go to the larger index"),
    Mutant("fused_avx512_assign_ties_to_larger", "csrc/spherical_assign/fused_argmax_avx512.h",
           "_mm512_mask_cmp_ps_mask(valid, v, cur, _CMP_GT_OQ);", "_mm512_mask_cmp_ps_mask(valid, v, cur, _CMP_GE_OQ);",
           ("tests/test_spherical_assign.py", "-k", "cpp"), "the fused AVX-512 assignment's ties go to the larger index", needs="avx512f"),
    Mutant("screen_margin_dropped", "csrc/spherical_assign/spherical_assign_cpu.cpp",
           "const float margin = 2 * sb::screen_error(C);", "const float margin = 0.f;",
           ("tests/test_spherical_assign.py", "-k", "bf16_screen"),
           "the bf16 screen keeps only its own best score, not every centroid within its error", needs="avx512_bf16"),
    Mutant("screen_prunes_at_the_best", "csrc/spherical_assign/screen_argmax_avx512bf16.h",
           "if (top > s.top) prune(s, threshold);", "if (top > s.top) prune(s, top);",
           ("tests/test_spherical_assign.py", "-k", "bf16_screen"),
           "a rising best bf16 score drops the earlier candidates within the screen's error", needs="avx512_bf16"),
    Mutant("screen_drops_tail_lane", "csrc/spherical_assign/screen_argmax_avx512bf16.h",
           "uint32_t hits = _mm512_mask_cmp_ps_mask(live,", "uint32_t hits = _mm512_mask_cmp_ps_mask(live >> 1,",
           ("tests/test_spherical_assign.py", "-k", "bf16_screen"),
           "the screen's scan skips the last centroid of every score vector", needs="avx512_bf16"),
    Mutant("screen_ties_to_larger", "csrc/spherical_assign/screen_argmax_avx512bf16.h",
           "if (exact[i] > b) b = exact[i], k = s.index[i];", "if (exact[i] >= b) b = exact[i], k = s.index[i];",
           ("tests/test_spherical_assign.py", "-k", "bf16_screen"),
           "the re-scored candidates' ties go to the larger index", needs="avx512_bf16"),
    Mutant("screen_crowded_rows_unscored", "csrc/spherical_assign/spherical_assign_cpu.cpp",
           "labels[crowded[i]] = sub_labels[i], best[crowded[i]] = sub_best[i];",
           "best[crowded[i]] = sub_best[i];",
           ("tests/test_spherical_assign.py", "-k", "bf16_screen"),
           "rows with more candidates than the screen keeps never get the fp32 kernel's label", needs="avx512_bf16"),
    Mutant("matmul_nt_gram_skips_diagonal_tiles", "csrc/matmul_nt/matmul_nt_avx512.h",
           "return !symmetric || n0 + p * kNr + kNr - 1 >= r0 + i * kMr;",
           "return !symmetric || n0 + p * kNr >= r0 + i * kMr;",
           ("tests/test_matmul_nt.py",), "the AVX-512 Gram skips the tiles that straddle the diagonal", needs="avx512f"),
    Mutant("omp_skips_a_needed_column", "csrc/sparse_code/active_set_solvers.inc",
           "if (!f.add(j, gram_column(gram, j, gbuf), eps, /*with_column=*/n + 1 < n_max)) break;",
           "if (!f.add(j, gram_column(gram, j, gbuf), eps, /*with_column=*/n + 2 < n_max)) break;",
           ("tests/test_sparse_code.py", "-k", "omp"),
           "OMP leaves out the Q column of its second-to-last atom too, which its last step reads"),
    Mutant("lars_join_sign_flipped", "csrc/sparse_code/active_set_solvers.inc",
           "return positive || q_k > 0 ? 1.0 : -1.0;", "return positive || q_k < 0 ? 1.0 : -1.0;",
           ("tests/test_sparse_code.py", "-k", "homotopy"), "a concept joins the homotopy with the wrong sign"),
    Mutant("lars_step_leaves_q", "csrc/sparse_code/active_set_solvers.inc",
           "    q[k] -= gamma * a[k];\n    a[k] -= coef * column[k];", "    a[k] -= coef * column[k];",
           ("tests/test_sparse_code.py", "-k", "homotopy"),
           "the homotopy's pass after a join leaves the correlations where the step began"),
    Mutant("lars_step_along_new_direction", "csrc/sparse_code/active_set_solvers.inc",
           "    q[k] -= gamma * a[k];\n    a[k] -= coef * column[k];",
           "    a[k] -= coef * column[k];\n    q[k] -= gamma * a[k];",
           ("tests/test_sparse_code.py", "-k", "homotopy"),
           "the homotopy's pass after a join moves the correlations along the new direction instead of the step's"),
    Mutant("lars_join_at_later_crossing", "csrc/sparse_code/active_set_solvers.inc",
           "(down > T(0)) & (down < tk) ? down : tk;", "(down > T(0)) & (down > tk) ? down : tk;",
           ("tests/test_sparse_code.py", "-k", "homotopy"),
           "the homotopy's join step takes the later of a concept's two crossings of ±λ"),
    Mutant("lars_downdate_rotates_q_wrongly", "csrc/sparse_code/active_set_solvers.inc",
           "qb[k] = c1 * b - s1 * a;", "qb[k] = c1 * b + s1 * a;",
           ("tests/test_sparse_code.py", "-k", "homotopy"), "a leaving code's downdate rotates Q's columns the wrong way"),
    Mutant("screened_homotopy_never_grows", "csrc/sparse_code/active_set_solvers.inc",
           "if (viol.empty()) return false;", "return false;",
           ("tests/test_sparse_code.py", "-k", "screened"), "the screened homotopy stops at its first working set"),
    Mutant("lasso_gram_rule_ignores_screening", "gig_fast/ops/sparse_code.py",
           "per_row = GRAMLESS_SCREENED_CONCEPTS_PER_ROW if K > SCREENED_ABOVE else GRAMLESS_LASSO_CONCEPTS_PER_ROW",
           "per_row = GRAMLESS_SCREENED_CONCEPTS_PER_ROW",
           ("tests/test_sparse_code.py", "-k", "small_lasso"),
           "a Lasso call up to 2,048 concepts skips the Gram matrix below K / 32 rows, as screened calls do"),
    Mutant("lockstep_drops_growing_rows", "csrc/sparse_code/active_set_solvers.inc",
           "        again[i] = 1;\n", "",
           ("tests/test_sparse_code.py", "-k", "screened or lockstep"),
           "a vector whose working set grew leaves the lockstep rounds unfinished"),
    Mutant("lockstep_new_gram_rows_mirrored_wrong", "csrc/sparse_code/active_set_solvers.inc",
           "grown[i * m + j] = block[(j - m0) * m + i];", "grown[i * m + j] = block[(j - m0) * m + j];",
           ("tests/test_sparse_code.py", "-k", "screened or lockstep"),
           "a later round's new G_WW columns are not the mirror of its new rows"),
    Mutant("lockstep_residual_sign", "csrc/sparse_code/active_set_solvers.inc",
           "for (int64_t t = 0; t < C; ++t) rd[t] -= ui * static_cast<double>(vs[t]);",
           "for (int64_t t = 0; t < C; ++t) rd[t] += ui * static_cast<double>(vs[t]);",
           ("tests/test_sparse_code.py", "-k", "screened or lockstep"),
           "the lockstep rounds' residual adds the codes' reconstruction instead of subtracting it"),
    Mutant("omp_lockstep_codes_to_first_group", "csrc/sparse_code/active_set_solvers.inc",
           "omp_codes_of(vs[i].f, vs[i].z, codes[g0 + i]);", "omp_codes_of(vs[i].f, vs[i].z, codes[i]);",
           ("tests/test_sparse_code.py", "-k", "lockstep"),
           "the OMP lockstep steps write every group's codes into the first group's rows"),
    Mutant("omp_lockstep_gram_rows_of_other_atoms", "csrc/sparse_code/active_set_solvers.inc",
           "std::copy(V + atom[active[a]] * C, V + (atom[active[a]] + 1) * C, vj + a * C);",
           "std::copy(V + atom[a] * C, V + (atom[a] + 1) * C, vj + a * C);",
           ("tests/test_sparse_code.py", "-k", "lockstep"),
           "once a vector has stopped, the OMP lockstep step takes the Gram rows of other vectors' atoms"),
    Mutant("packed_columns_one_channel_short", "csrc/matmul_nt/matmul_nt_cpu.cpp",
           "packed_.get(), N, C, /*symmetric=*/false", "packed_.get(), N, C - 1, /*symmetric=*/false",
           ("tests/test_sparse_code.py", "-k", "lockstep"),
           "the product against the packed columns reads their panels as if they had one channel fewer", needs="avx512f"),
    Mutant("matmul_tiles_pack_the_first_tile", "csrc/matmul_nt/matmul_nt_cpu.cpp",
           "pack_panel_range(b + n0 * C, cols, C", "pack_panel_range(b, cols, C",
           ("tests/test_matmul_nt.py", "-k", "tiles"),
           "the product by tiles packs b's first columns for every tile", needs="avx512f"),
    Mutant("matmul_tiles_first_row_block_only", "csrc/matmul_nt/matmul_nt_cpu.cpp",
           "for (int64_t rb = 0; rb < row_blocks; ++rb) {  // out shifted", "for (int64_t rb = 0; rb < 1; ++rb) {  // out shifted",
           ("tests/test_matmul_nt.py", "-k", "tiles"),
           "the product by tiles multiplies only a's first row block", needs="avx512f"),
    Mutant("omp_gram_rule_inverted", "gig_fast/ops/sparse_code.py",
           "GRAMLESS_OMP_CONCEPTS_PER_ATOM) < K", "GRAMLESS_OMP_CONCEPTS_PER_ATOM) > K",
           ("tests/test_sparse_code.py", "-k", "lockstep or small"),
           "OMP calls of many rows skip the Gram matrix and those of few rows form it"),
    Mutant("omp_screen_without_its_bound", "csrc/sparse_code/omp_screened.inc",
           "margin = static_cast<float>(2 * screen_bound(", "margin = static_cast<float>(0 * screen_bound(",
           ("tests/test_sparse_code.py", "-k", "screened"),
           "the screened OMP re-scores only the concepts tied with its best bf16 score", needs="avx512_bf16"),
    Mutant("omp_screen_crowded_rows_unscored", "csrc/sparse_code/omp_screened.inc",
           "const std::vector<int32_t>& scored = overflow ? every : index;",
           "const std::vector<int32_t>& scored = index;", ("tests/test_sparse_code.py", "-k", "screened"),
           "rows with more candidates than the screen keeps stop coding instead of being scored over all K",
           needs="avx512_bf16"),
    Mutant("omp_screen_threads_skip_a_panel", "csrc/sparse_code/omp_screened.inc",
           "const int64_t k_begin = panels * t / T * Nr,", "const int64_t k_begin = (panels * t / T + (t > 0)) * Nr,",
           ("tests/test_sparse_code.py", "-k", "screened"),
           "with two threads the second one's first panel of concepts is never screened", needs="avx512_bf16"),
    Mutant("screen_short_tile_drops_a_row", "csrc/spherical_assign/screen_argmax_avx512bf16.h",
           "if (left <= 4)", "if (left <= 5)", ("tests/test_sparse_code.py", "-k", "screened"),
           "a last panel of 5 rows is screened by the 4-row tile: its fifth row keeps another row's scores",
           needs="avx512_bf16"),
    Mutant("screen_short_tile_drops_a_row_of_nine", "csrc/spherical_assign/screen_argmax_avx512bf16.h",
           "else if (left <= 8)", "else if (left <= 9)", ("tests/test_sparse_code.py", "-k", "screened"),
           "a last panel of 9 rows is screened by the 8-row tile: its ninth row keeps another row's scores",
           needs="avx512_bf16"),
    Mutant("omp_screen_residual_not_rebuilt", "csrc/sparse_code/omp_screened.inc",
           "if (v.coding && step + 1 < n_max) v.rebuild_residual(V, C, n_max);", "",
           ("tests/test_sparse_code.py", "-k", "screened"),
           "the screened OMP keeps the first step's residual instead of rebuilding it after each atom",
           needs="avx512_bf16"),
    Mutant("omp_residual_update_sign", "csrc/sparse_code/active_set_solvers.inc",
           "f.axpy_column(q.data(), n, static_cast<T>(z[n]));", "f.axpy_column(q.data(), n, static_cast<T>(-z[n]));",
           ("tests/test_sparse_code.py", "-k", "omp"), "OMP adds the new atom's share back to the residual correlations"),
    Mutant("gig_endpoints_swapped", "gig_fast/gig/engine.py",
           "return attr, ends[:, 0], ends[:, 1]", "return attr, ends[:, 1], ends[:, 0]",
           ("tests/test_gig.py", "-k", "not captum"), "T(X(1)) and T(X(0)) swapped in the completeness delta"),
    Mutant("tail_gradient_of_first_image", "gig_fast/gig/tail.py",
           "else field[self.owner[t][image]]", "else field[self.owner[t][image] * 0]",
           ("tests/test_affine_tail.py",), "every row's backward starts from the first image's target at the tail's boundary"),
    Mutant("tail_takes_a_relu", "gig_fast/gig/tail.py",
           "nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity)",
           "nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity, nn.ReLU)",
           ("tests/test_affine_tail.py",), "a ReLU counted as affine: the tail's gradients taken at zeros are wrong"),
    Mutant("tail_field_assumed_constant", "gig_fast/gig/tail.py",
           "if g.dim() == 4 and _same_at_every_position(g):", "if g.dim() == 4:",
           ("tests/test_affine_tail.py",), "a strided convolution's boundary gradient kept at one position"),
    Mutant("head_mask_of_first_rows", "gig_fast/gig/head.py",
           "mask = saved[i][r0:r1]", "mask = saved[i][:r1 - r0]",
           ("tests/test_batched_head.py",), "every block of rows takes the ReLU masks of the first rows"),
    Mutant("head_relu_writes_into_seed", "gig_fast/gig/head.py",
           "torch.ops.aten.threshold_backward.grad_input(g, mask, 0, grad_input=g) if own",
           "torch.ops.aten.threshold_backward.grad_input(g, mask, 0, grad_input=g) if True",
           ("tests/test_batched_head.py",), "the ReLU backward writes into a cotangent that is not its own (a seed)"),
    Mutant("head_sum_operand_owns_cotangent", "gig_fast/gig/head.py",
           "give(step.args[0], g, False)", "give(step.args[0], g, own)",
           ("tests/test_batched_head.py",), "a sum's first operand may overwrite the cotangent its second one reads"),
    Mutant("head_blocks_straddle_nodes", "gig_fast/gig/head.py",
           "step = rows // align * align", "step = rows",
           ("tests/test_batched_head.py",), "blocks of rows cut across the fixed rule's nodes"),
    Mutant("partial_node_first_weight", "gig_fast/gig/engine.py",
           "weights[node:node + 1]", "weights[0:1]",
           ("tests/test_batched_head.py",), "a block inside one node projected with the first node's weight"),
    Mutant("adaptive_walk_overshoots_room", "gig_fast/gig/adaptive.py",
           "stop = (picked_before >= room[:, None])", "stop = (picked_before > room[:, None])",
           ("tests/test_adaptive_rule.py",), "the adaptive rule's walk picks one subinterval more than max_steps leaves"),
    Mutant("adaptive_new_nodes_overwrite", "gig_fast/gig/adaptive.py",
           "slot = self.count[image] + np.arange(len(image))", "slot = np.arange(len(image))",
           ("tests/test_adaptive_rule.py",), "an image's new nodes overwrite its first ones instead of joining them"),
    Mutant("stacked_seeds_offsets_dropped", "gig_fast/gig/tail.py",
           "if o is None else o.to(units.device) + offsets[t]", "if o is None else o.to(units.device)",
           ("tests/test_batched_head.py", "tests/test_affine_tail.py"),
           "the batched head seeds every per-image target with the first target's concept vectors"),
    Mutant("stacked_seeds_first_image", "gig_fast/gig/tail.py",
           "pick = self.pick if self.pick.shape[1] == 1 else self.pick[:, image]",
           "pick = self.pick[:, :1]",
           ("tests/test_batched_head.py", "tests/test_affine_tail.py"),
           "the batched head seeds every row with the first image's per-image targets"),
    Mutant("head_1x1_weight_scrambled", "gig_fast/gig/head.py",
           "grad = cols @ conv.weight.reshape(conv.out_channels, C)",
           "grad = cols @ conv.weight.reshape(C, conv.out_channels).T",
           ("tests/test_batched_head.py",), "a 1×1 convolution's input gradient multiplies by its weight read in the wrong order"),
    Mutant("accumulate512_tree_mixes_lanes", "csrc/gig_accumulate/accumulate_avx512.h",
           "return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),",
           "return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z0, _MM_SHUFFLE(2, 0, 2, 0)),",
           ("tests/test_gig_accumulate.py",), "the AVX-512 kernel's last level of sums takes one half twice", needs="avx512f"),
    Mutant("accumulate512_group_of_7", "csrc/gig_accumulate/accumulate_avx512.h",
           "const int64_t n = std::min<int64_t>(8, codes.n[i] - k0);", "const int64_t n = std::min<int64_t>(7, codes.n[i] - k0);",
           ("tests/test_gig_accumulate.py",), "the AVX-512 kernel leaves the 8th active concept of each group of 8 unwritten", needs="avx512f"),
    Mutant("accumulate512_lower_half_twice", "csrc/gig_accumulate/accumulate_avx512.h",
           "_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)", "_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 0)",
           ("tests/test_gig_accumulate.py",), "the AVX-512 kernel's groups of 8 add each sum's lower half twice", needs="avx512f"),
    Mutant("accumulate512_sixteen_in_order", "csrc/gig_accumulate/accumulate_avx512.h",
           "for (int64_t j = 0; j < 16; ++j) o[codes.slot[i * s + k0 + j]] = r[j];",
           "for (int64_t j = 0; j < 16; ++j) o[k0 + j] = r[j];",
           ("tests/test_gig_accumulate.py",), "the AVX-512 kernel writes a group of 16 active concepts to the first slots, not theirs", needs="avx512f"),
    Mutant("accumulate512_node_weight_dropped", "csrc/gig_accumulate/accumulate_avx512.h",
           "float scale = w[0];", "float scale = 1.0f;",
           ("tests/test_gig_accumulate.py",), "the AVX-512 kernel forgets a single node's weight", needs="avx512f"),
    Mutant("matmul_blas_gram_drops_last_row", "csrc/matmul_nt/matmul_nt_cpu.cpp",
           "const int64_t r1 = std::min(M, r0 + rows);", "const int64_t r1 = std::min(M - 1, r0 + rows);",
           ("tests/test_matmul_nt.py",), "BLAS's Gram by row blocks leaves the last row out of its last block"),
    Mutant("accumulate256_tree_mixes_lanes", "csrc/gig_accumulate/accumulate_avx2.h",
           "_mm256_permute2f128_ps(y[0], y[1], 0x31)", "_mm256_permute2f128_ps(y[0], y[1], 0x21)",
           ("tests/test_gig_accumulate.py",), "the AVX2 kernel's last level of sums pairs the wrong halves", needs="avx2"),
    Mutant("accumulate256_group_of_7", "csrc/gig_accumulate/accumulate_avx2.h",
           "const int64_t n = std::min<int64_t>(8, codes.n[i] - k0);", "const int64_t n = std::min<int64_t>(7, codes.n[i] - k0);",
           ("tests/test_gig_accumulate.py",), "the AVX2 kernel leaves the 8th active concept of each group unwritten", needs="avx2"),
    Mutant("accumulate256_slots_in_order", "csrc/gig_accumulate/accumulate_avx2.h",
           "o[codes.slot[i * s + k0 + j]] = r[j];", "o[k0 + j] = r[j];",
           ("tests/test_gig_accumulate.py",), "the AVX2 kernel writes the active concepts' results first, not to their slots", needs="avx2"),
    Mutant("accumulate256_drops_last_node", "csrc/gig_accumulate/accumulate_avx2.h",
           "for (int64_t k = 0; k < m; ++k) {", "for (int64_t k = 0; k + 1 < m; ++k) {",
           ("tests/test_gig_accumulate.py",), "the AVX2 kernel's weighted sum over the nodes leaves out the last", needs="avx2"),
    Mutant("centroid_update_drops_last_row", "gig_fast/ops/reference.py",
           "return segment_sum(X.to(acc), labels, K), torch.bincount(labels, minlength=K)",
           "return segment_sum(X[:-1].to(acc), labels[:-1], K), torch.bincount(labels, minlength=K)",
           ("tests/test_centroid_update.py",), "the reference update forgets the last point"),
]

# Mutants of the second round: the patterns the suite did not look for (selections checked by value, the run
# key, boundary ids, stored ranks, paths the fixtures did not reach, escaping), and one or more in every module
# of gig_fast/ that the first round left alone.
RUN_VALUES, RUN_BOUNDS, STORED, ESCAPING = ("tests/test_run_values.py",), ("tests/test_run_boundaries.py",), \
    ("tests/test_stored_files.py",), ("tests/test_report_escaping.py",)
MUTANTS += [
    Mutant("shared_concepts_max_not_min", "gig_fast/pipeline/selection.py",
           "both = np.minimum(s1 / s1.max(), s2 / s2.max())", "both = np.maximum(s1 / s1.max(), s2 / s2.max())",
           ("tests/test_selection_rules.py",), "a pair's shared concepts scored by the larger of the two classes' scores"),
    Mutant("class_scores_every_target", "gig_fast/pipeline/selection.py",
           "total[classes] += sums[:, :n_top].sum(1)", "total[classes] += sums.sum(1)",
           ("tests/test_selection_rules.py",), "a class's concept scores add its shared targets to its top ones"),
    Mutant("top_sets_skip_the_first", "gig_fast/pipeline/selection.py",
           'return np.argsort(-scores, axis=1, kind="stable")[:, :k]',
           'return np.argsort(-scores, axis=1, kind="stable")[:, 1:k + 1]',
           RUN_VALUES, "a class's top set starts at its second strongest concept (caught on a run)"),
    Mutant("run_key_forgets_top_shared", "gig_fast/pipeline/config.py",
           '"report_crops", "graph_images", "graph_pairs", "error_nodes"}',
           '"report_crops", "graph_images", "graph_pairs", "error_nodes", "top_shared"}',
           ("tests/test_run_key.py",), "top_shared left out of the run key (a relaunch resumes the old targets)"),
    Mutant("edge_normalized_signed", "gig_fast/pipeline/graph.py",
           '"normalized": _r(abs(w) / peak if peak > 0 else 0.0)}', '"normalized": _r(w / peak if peak > 0 else 0.0)}',
           STORED, "graph.json's edge display weight keeps the sign (outside [0, 1])"),
    Mutant("class_id_one_past_the_last", "gig_fast/api/run.py",
           "0 <= int(name_or_id) < len(self.classes)", "0 <= int(name_or_id) <= len(self.classes)",
           RUN_BOUNDS, "Run accepts the class id n (an empty graph; the server answered 500)"),
    Mutant("concept_id_one_past_the_last", "gig_fast/api/run.py",
           "not 0 <= int(concept) < K", "not 0 <= int(concept) <= K",
           RUN_BOUNDS, "Run accepts the concept id K"),
    Mutant("store_ranks_from_zero", "gig_fast/image_store.py",
           '"rank": r + 1,', '"rank": r,', STORED, "the store's per-concept image ranks start at 0"),
    Mutant("store_ranks_least_used_first", "gig_fast/image_store.py",
           "order = np.lexsort((merged[0], -merged[2], group))", "order = np.lexsort((merged[0], merged[2], group))",
           STORED, "the store ranks a concept's images by usage ascending"),
    Mutant("drop_one_prefix_token_only", "gig_fast/models/transformer.py",
           'return self.prefix if self.class_token == "drop" else 0', 'return 1 if self.class_token == "drop" else 0',
           ("tests/test_transformer_prefix.py",), "class_token=drop skips the class token but samples register tokens"),
    Mutant("dropped_prefix_not_renumbered", "gig_fast/srd.py",
           "pos = pos.long() + skip  # positions in the point's own numbering", "pos = pos.long()",
           ("tests/test_transformer_prefix.py",), "positions chosen among patch tokens are stored as row positions"),
    Mutant("beta_ignores_add_alpha", "gig_fast/slicing.py",
           'scale = node.kwargs.get("alpha", 1) if k == 1 else 1', "scale = 1",
           ("tests/test_beta_scaled_residual.py",), "β at torch.add(a, b, alpha=s) adds b's shift unscaled"),
    Mutant("refinement_always_replaces", "gig_fast/gig/engine.py",
           "better = worst < np.array([fixed_excess[b] for b in flagged])  # keep whichever is more complete",
           "better = np.ones(len(flagged), dtype=bool)",
           ("tests/test_refinement_cap.py",), "a capped refinement replaces the fixed rule even when it is worse"),
    Mutant("concept_backward_seed_doubled", "gig_fast/gig/targets.py",
           "rows = _unit_rows(target, out, image)  ", "rows = 2 * _unit_rows(target, out, image)  ",
           ("tests/test_gig.py", "-k", "not captum"), "a concept target's backward starts from twice its gradient"),
    Mutant("adaptive_weights_doubled", "gig_fast/gig/adaptive.py",
           "w[:, 1:] += h / 2", "w[:, 1:] += h",
           ("tests/test_adaptive_rule.py",), "the adaptive rule's trapezoid weights count each node's left half twice"),
    Mutant("adaptive_bisects_the_best", "gig_fast/gig/adaptive.py",
           "order = np.argsort(-badness, axis=1, kind=\"stable\")", "order = np.argsort(badness, axis=1, kind=\"stable\")",
           ("tests/test_adaptive_rule.py",), "the adaptive rule bisects the most complete subintervals first"),
    Mutant("summary_unescaped", "gig_fast/explorer/summary.py",
           "e = lambda s: html.escape(str(s), quote=True)", "e = lambda s: str(s)",
           ESCAPING, "the report's summary writes run strings (model, layers, classes) as HTML"),
    Mutant("images_scaled_by_std", "gig_fast/data.py",
           "return (t - mean) / std", "return (t - mean) * std",
           ("tests/test_data.py",), "image normalisation multiplies by the std"),
    Mutant("cli_user_error_exit_1", "gig_fast/cli.py",
           "        return 2\n", "        return 1\n",
           ("tests/test_config.py",), "a user error exits with status 1 instead of the documented 2"),
    Mutant("auc_ignores_x", "gig_fast/validation/metrics.py",
           "return np.trapezoid(y, x=x, axis=-1)", "return np.trapezoid(y, dx=1.0 / (y.shape[-1] - 1), axis=-1)",
           ("tests/test_validation.py", "-k", "auc"), "the AUC of a curve on uneven positions taken as evenly spaced"),
    Mutant("triton_centroid_update_drops_last_row", "gig_fast/kernels/centroid_update.py",
           "r_ok = rows < N\n", "r_ok = rows < N - 1\n",
           ("tests/test_centroid_update.py", "-k", "triton"), "the Triton centroid sums skip the last point"),
    Mutant("oracle_dense_codes_unsigned", "gig_fast/testing/coding_problems.py",
           "torch.where(ok, val2, 0)", "torch.where(ok, val2.abs(), 0)",
           ("tests/test_sparse_code.py",), "the tests' dense-code oracle loses signs (the tests must disagree)"),
    Mutant("cpp_extension_never_found", "gig_fast/_extensions.py",
           'return _import("gig_fast._C")', 'return _import("gig_fast._C_missing")',
           ("tests/test_backend.py", "-k", "not cuda_extension"),  # the CUDA extension is not built on CPU machines
           "the C++ extension is reported missing where it is built"),
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
    for so in list((ROOT / "gig_fast").glob("*.so")) or _installed_extensions():
        if not (dest / "gig_fast" / so.name).exists():
            shutil.copy2(so, dest / "gig_fast" / so.name)


def _installed_extensions() -> list[Path]:
    """The compiled extensions of an installed gig_fast (CI installs the package and builds nothing in the
    checkout); found from outside the checkout so that the installed copy is the one imported."""
    probe = "import gig_fast, pathlib; print(pathlib.Path(gig_fast.__file__).parent)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=Path.home(), capture_output=True, text=True)
    folder = Path(proc.stdout.strip()) if proc.returncode == 0 else None
    return sorted(folder.glob("*.so")) if folder and folder.resolve() != (ROOT / "gig_fast").resolve() else []


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (``/proc/cpuinfo``), or None where the system does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return set(line.split(":", 1)[1].split()) if line else None


def changed_files(ref: str) -> set[str]:
    """Files that differ from ``ref`` in the working tree (committed since or not), and untracked ones."""
    diff = subprocess.run(["git", "diff", "--name-only", ref, "--"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.split()
    new = subprocess.run(["git", "ls-files", "-o", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.split()
    return set(diff) | set(new)


def touched_by(m: Mutant, changed: set[str]) -> bool:
    """Whether a change of these files needs mutant ``m`` run: its file or one of its test files changed."""
    return m.path in changed or any(t in changed for t in m.tests if t.endswith(".py"))


def _build(tree: Path) -> None:
    """Rebuild the CPU extension in the copy (incremental: only the changed source recompiles)."""
    env = dict(os.environ, GIG_FAST_SKIP_CUDA="1")
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env, check=True,
                   capture_output=True)


def _run_tests(tree: Path, tests: tuple, timeout: int) -> tuple[str, float, str]:
    """``(status, seconds, the first failing test's id or "")`` of one test selection in the copy."""
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=tree, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    status = {0: "survived", 1: "killed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    failed = [line.split(" ", 1)[1].split(" - ", 1)[0] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return status, time.time() - t0, failed[0] if failed else ""


def baseline(mutants: list[Mutant], timeout: int) -> bool:
    """Run each distinct test selection of ``mutants`` on the unmutated copy: a mutant only counts as
    killed by tests that pass without it."""
    tree = SCRATCH / "tree"
    _copy_tree(tree)
    ok = True
    for tests in dict.fromkeys(m.tests for m in mutants):
        status, seconds, _ = _run_tests(tree, tests, timeout)
        passed = status == "survived"  # pytest exit 0
        ok &= passed
        print(f"{'baseline':32s} {'passes' if passed else status:10s} {seconds:6.1f} s  {' '.join(tests)}", flush=True)
    return ok


def check(mutants: list[Mutant], timeout: int, budget: float | None = None) -> list[tuple[Mutant, str, float, str]]:
    """``(mutant, status, seconds, killing test)`` per mutant, each applied to the copy, tested and reverted."""
    tree = SCRATCH / "tree"
    _copy_tree(tree)
    results = []
    t0 = time.time()
    flags = cpu_flags()
    for m in mutants:
        if m.needs and flags is not None and m.needs not in flags:  # the mutated code never runs on this CPU
            results.append((m, f"not run (this CPU lacks {m.needs})", 0.0, ""))
            print(f"{m.name:32s} {results[-1][1]}", flush=True)
            continue
        if budget is not None and time.time() - t0 > budget:
            results.append((m, "not run (time budget)", 0.0, ""))
            print(f"{m.name:32s} not run (time budget)", flush=True)
            continue
        path = tree / m.path
        original = path.read_text(encoding="utf-8")
        if original.count(m.find) != 1:
            results.append((m, f"stale: the snippet occurs {original.count(m.find)} times", 0.0, ""))
            print(f"{m.name:32s} {results[-1][1]}", flush=True)
            continue
        cpp = m.path.startswith("csrc/")
        try:
            path.write_text(original.replace(m.find, m.replace), encoding="utf-8")
            if cpp:
                _build(tree)
            status, seconds, killer = _run_tests(tree, m.tests, timeout)
        finally:
            path.write_text(original, encoding="utf-8")
            if cpp:
                _build(tree)
        results.append((m, status, seconds, killer))
        print(f"{m.name:32s} {status:10s} {seconds:6.1f} s  {m.what}  [{killer}]", flush=True)
    return results


def markdown(results) -> str:
    rows = "\n".join(f"| `{m.name}` | {m.what} | `{m.path}` | `{' '.join(m.tests)}` | `{killer}` | **{status}** | {s:.0f} |"
                     for m, status, s, killer in results)
    killed = sum(1 for _, status, _, _ in results if status == "killed")
    modules = sorted({m.path for m, _, _, _ in results})
    return (f"# Mutation check\n\n`python tools/mutation_check.py` injects each bug below into a copy of the tree and "
            f"runs the tests named beside it; the killing test is the first that failed. Last run: "
            f"{time.strftime('%Y-%m-%d')}, {killed} of {len(results)} mutants killed.\n\n"
            "| mutant | the bug | file | tests | killed by | result | seconds |\n|---|---|---|---|---|---|---|\n" + rows +
            "\n\nFiles mutated: " + ", ".join(f"`{p}`" for p in modules) + ".\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per mutant's test run")
    ap.add_argument("--markdown", help="write the result table to this file")
    ap.add_argument("--changed-since", metavar="REF", help="only the mutants of files (or tests) changed since REF")
    ap.add_argument("--time-budget", type=float, metavar="S", help="start no mutant after S seconds")
    ap.add_argument("--baseline", action="store_true", help="first run each test selection on the unmutated copy")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        ap.error(f"unknown mutant(s); known: {[m.name for m in MUTANTS]}")
    if args.changed_since:
        changed = changed_files(args.changed_since)
        chosen = [m for m in chosen if touched_by(m, changed)]
        print(f"{len(chosen)} mutant(s) of the files changed since {args.changed_since}", flush=True)
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path}  [{' '.join(m.tests)}]  {m.what}")
        return 0
    if args.baseline and not baseline(chosen, args.timeout):
        print("the unmutated tree fails a selection: no mutant is checked", flush=True)
        return 1
    results = check(chosen, args.timeout, args.time_budget)
    if args.markdown:
        Path(args.markdown).write_text(markdown(results), encoding="utf-8")
    return 0 if all(status == "killed" or status.startswith("not run (") for _, status, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
