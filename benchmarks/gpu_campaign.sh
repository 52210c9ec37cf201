#!/usr/bin/env bash
# One campaign on a GPU machine: build the CUDA extension there, check every backend against the
# reference (the GPU rows of the test suite), run the benchmark suite (pytest-benchmark, full size:
# every route checked against its reference, then timed) topic by topic, and write the results file,
# pytest-benchmark's JSON per topic, the logs and a Markdown table to $OUT (first argument): results.jsonl,
# table.md and device.txt as they are, the rest packed in campaign.tar.gz (a device call returns ≤ 8 files).
# Rows are recorded only when the GPU tests passed within their budget; otherwise the suite still
# runs (its log and JSON are kept for diagnosis) and the script exits non-zero.
#
#   bash benchmarks/gpu_campaign.sh "$OUT" [topic ...]        # topics: bench_<topic>.py, default all
#
# Topic pipeline_scale (not in the default list): the pipeline's scale run (bench_pipeline.py
# --scale gpu: ResNet-50, 16 blocks, K = 8·C, time-boxed stages within GIG_FAST_SCALE_BUDGET s, default
# 420, killed 60 s later), its summary copied to $OUT/pipeline_scale_summary.json. One call of <= 8 min:
#
#   GIG_FAST_SKIP_BUILD=1 GIG_FAST_TEST_BUDGET=0 bash benchmarks/gpu_campaign.sh "$OUT" pipeline_scale
#
# GIG_FAST_SKIP_BUILD=1: use the carried build (gig_fast/_C*.so) when its CUDA backend loads, else build.
# GIG_FAST_TEST_BUDGET=0: no GPU test suite; then only pipeline_scale records rows (it checks its own
# results: finite codes, and the default route's codes against the pure-torch route's on its subset).
#
# GIG_FAST_CAMPAIGN_DEVICE=cpu: a dry run of the same script on a machine without a GPU, so that it cannot
# rot between device windows — the CPU build is used (or built), the GPU test suite is skipped, every topic
# runs at the smoke size (GIG_FAST_BENCH_SIZE overrides), pipeline_scale runs its CPU plan, and nothing is
# recorded unless GIG_FAST_RECORD=1:
#
#   GIG_FAST_CAMPAIGN_DEVICE=cpu GIG_FAST_SCALE_BUDGET=120 bash benchmarks/gpu_campaign.sh "$OUT" gig pipeline_scale
#
# Outside baselines (Captum, flash-kmeans) travel as wheels in .whl/ (see README: Benchmarks).
set -uo pipefail
DEVICE=${GIG_FAST_CAMPAIGN_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  SIZE=${GIG_FAST_BENCH_SIZE:-smoke}; SCALE_PLAN=cpu; GIG_FAST_TEST_BUDGET=0
else
  SIZE=${GIG_FAST_BENCH_SIZE:-}; SCALE_PLAN=gpu
fi
TMP=${TMPDIR:-/tmp}
OUT=${1:-${OUT:-$TMP/gig_fast_gpu}}
SITE=$TMP/site                      # the outside baselines' wheels, installed for the campaign
SCALE_OUT=$TMP/gig_pipeline_scale   # the scale run's folder (its work folder is GBs: not under $OUT; a rerun resumes)
shift || true
TOPICS=("$@")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 GIG_FAST_RESULTS="$OUT/results.jsonl"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

# A device call brings back at most 8 files of at most 16 MiB from $OUT: on exit (also after a failed
# build or a time-out) everything but results.jsonl, table.md and device.txt goes into campaign.tar.gz
# (logs, per-topic JSON, profile and trace), split into 15 MiB parts if larger
# (`cat campaign.tar.gz.part-* > campaign.tar.gz` to reassemble).
pack() {
  ( cd "$OUT" || exit 0
    shopt -s nullglob
    keep=(results.jsonl table.md device.txt)
    items=()
    for f in *; do
      case " ${keep[*]} " in *" $f "*) continue ;; esac
      case "$f" in campaign.tar.gz*) continue ;; esac
      items+=("$f")
    done
    [ ${#items[@]} -gt 0 ] || exit 0
    tar -czf campaign.tar.gz "${items[@]}" && rm -rf "${items[@]}"
    if [ "$(stat -c %s campaign.tar.gz)" -gt $((15 * 1024 * 1024)) ]; then
      split -b 15M campaign.tar.gz campaign.tar.gz.part- && rm campaign.tar.gz
    fi
    ls -la "$OUT" )
}
trap pack EXIT

{ if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc --version | tail -1; else echo "CPU dry run: $(nproc) cores"; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

backend_runs() { python3 -c "import gig_fast, sys; sys.exit(gig_fast.ops.available_backends().get('$1') != 'runs')" 2>/dev/null; }
if [ "$DEVICE" = cpu ]; then
  backend_runs cpp || GIG_FAST_SKIP_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { stamp "BUILD FAILED"; grep -a -E "error" "$OUT/build.log" | head -40; exit 1; }
elif [ "${GIG_FAST_SKIP_BUILD:-0}" = 1 ] && backend_runs cuda; then
  stamp "using the carried build of the extensions"
else
  stamp "building the extensions (sm_90, register report in build.log)"
  GIG_FAST_CUDA_ARCH=90 GIG_FAST_PTXAS_VERBOSE=1 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { stamp "BUILD FAILED"; grep -a -E "error" "$OUT/build.log" | head -40; exit 1; }
  grep -a -E "registers|spill" "$OUT/build.log" | grep -a -v " 0 bytes spill" | head -5
fi
python3 -c "import gig_fast; print(gig_fast.ops.available_backends(), gig_fast._extensions.extension_errors())"

record=()
tests_status=0
if [ "${GIG_FAST_TEST_BUDGET:-150}" = 0 ]; then
  stamp "GPU test suite skipped (GIG_FAST_TEST_BUDGET=0): only pipeline_scale, which checks itself, records rows"
  record=(--no-record)
else
  stamp "GPU correctness: the test suite's gpu rows (at most ${GIG_FAST_TEST_BUDGET:-150} s)"
  timeout "${GIG_FAST_TEST_BUDGET:-150}" python3 -m pytest tests -q -p no:cacheprovider -m gpu > "$OUT/tests_gpu.log" 2>&1
  tests_status=$?
  grep -a -E "passed|failed|FAILED|Error" "$OUT/tests_gpu.log" | tail -15
  if [ "$tests_status" -ne 0 ]; then
    stamp "GPU tests did not pass (status $tests_status): the benchmarks run for the log, NO rows are recorded"
    record=(--no-record)
  fi
fi
scale_record=(--results "$OUT/results.jsonl")
[ "$tests_status" -ne 0 ] && scale_record=()
[ "$DEVICE" = cpu ] && [ "${GIG_FAST_RECORD:-0}" != 1 ] && scale_record=()
size=(); [ -n "$SIZE" ] && size=(--gig-size "$SIZE")
profile_cases=(--B 32 2); [ "$DEVICE" = cpu ] && profile_cases=(--B 2 --repeats 1)

# Where one gig() call's time goes: the two headline cases (B = 32 and 2, m = 50, fixed rule)
# profiled once each, the shares in profile/gig_profile.md (its output also in bench.log), the first
# case's chrome trace in profile/gig_trace.json.gz. Time-boxed; it records no rows.
stamp "profile of gig() (at most ${GIG_FAST_PROFILE_BUDGET:-150} s)"
timeout "${GIG_FAST_PROFILE_BUDGET:-150}" python3 benchmarks/profile_gig.py --device "$DEVICE" --out "$OUT/profile" \
  "${profile_cases[@]}" --modes fixed --trace 2>&1 | tee -a "$OUT/bench.log" | grep -a -E "^###|Unprofiled|gig\.(forward|backward)|Python"
[ -f "$OUT/profile/gig_profile.md" ] || stamp "profile did not finish (see bench.log)"

# Each topic gets a time box, so that one slow module cannot eat the machine's whole time: at its end pytest gets
# SIGINT and still writes the JSON of the benchmarks it finished (their rows are recorded).
[ ${#TOPICS[@]} -gt 0 ] || TOPICS=(sparse_reconstruct gig kmeans sparse_code pipeline)
for topic in "${TOPICS[@]}"; do
  if [ "$topic" = pipeline_scale ]; then
    budget=${GIG_FAST_SCALE_BUDGET:-420}
    stamp "pipeline scale run: stages time-boxed within $budget s (killed at $(( budget + 60 )) s)"
    timeout -k 10 $(( budget + 60 )) python3 benchmarks/bench_pipeline.py --scale "$SCALE_PLAN" --device "$DEVICE" --budget "$budget" \
      --out "$SCALE_OUT" "${scale_record[@]}" 2>&1 | tee -a "$OUT/bench.log"
    scale_status=${PIPESTATUS[0]}
    [ "$scale_status" -ne 0 ] && { stamp "pipeline scale run FAILED (status $scale_status)"; tests_status=$scale_status; }
    python3 benchmarks/profile_pipeline.py --sampler-compare 2>&1 | tee -a "$OUT/bench.log"  # 16 cores: a pool for the draws?
    for f in summary stages; do  # the work folder stays behind (GBs); a cut run leaves stages.json
      [ -f "$SCALE_OUT/$f.json" ] && cp "$SCALE_OUT/$f.json" "$OUT/pipeline_scale_$f.json"
    done
    continue
  fi
  stamp "benchmark $topic"
  timeout -s INT -k 30 "${GIG_FAST_BENCH_BUDGET:-90}" python3 benchmarks/run.py "$topic" --gig-device "$DEVICE" "${size[@]}" \
    --results "$OUT/results.jsonl" --json "$OUT/bench_$topic.json" "${record[@]}" 2>&1 | tee -a "$OUT/bench.log"
done
[ -f "$OUT/results.jsonl" ] && python3 benchmarks/results.py render --results "$OUT/results.jsonl" --out "$OUT/table.md"
stamp "done"
exit "$tests_status"
