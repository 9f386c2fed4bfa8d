#!/usr/bin/env bash
# Everything this project measures on the GPU machine (see ../shared/gpu/README.md), by phase.
# Usage there, after staging the kernel wheels a, b, c and d and `source /tmp/gpu-site/env.sh`:
#   [SESSION=s5] bash scripts/gpu_session.sh PHASE...     (results and logs under $RES, default $OUT or ./gpu-out)
# Single-GPU phases honour CUDA_VISIBLE_DEVICES, so two can run side by side on a 2-GPU machine.
# Carry limit (64 MiB with the working tree, ~9 MB in s11): .gpu/a and .gpu/c came out over it. s11 moved
# a's xformers and apache_tvm_ffi wheels into b, and repacked c's FlashAttention-3 wheel as a tar.xz of its
# files (28 MB; unpacked with `python3 -m tarfile -e fa3.tar.xz /tmp/gpu-site`).
# Phase gap (scripts/compiled_gap.py): compiled attention_forward against compiled SDPA on bench_compiled's six
# problems, interleaved: synchronised wall, back-to-back, host-issue and device ms per call, kernels, Dynamo's
# graphs/breaks/guards, the baked decision, and what ran beside the samples; then the same two again beside the
# compiled best backend and the eager calls (bench_compiled's rounds). GAP_ARGS replaces the defaults (e.g.
# "--only sd15_512_self,hd256"); T_GAP bounds it (300 s).
set -uo pipefail
res=${RES:-${OUT:-gpu-out}}; mkdir -p "$res"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
day=$(date -u +%F)
DEV=${DEV:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | sed 's/NVIDIA //; s/ /-/g')}
late="/tmp/gpu-site:/tmp/gpu-site/nvidia_cutlass_dsl/dsl_packages"
nodiff=$(echo "$PYTHONPATH" | tr ':' '\n' | grep -v gpu-site | paste -sd:)
# SESSION=s5: every result file named <DEV>-<day>-... becomes <DEV>-<day>-s5-... (NOTES.md's names)
stamp() {
  [ -n "${SESSION:-}" ] || return 0
  local f base
  for f in "$res/${DEV:-GPU}-$day-"* "$res/H200x2-$day-"*; do
    [ -e "$f" ] || continue
    base=$(basename "$f")
    case $base in *"-$day-$SESSION-"*) continue ;; esac
    mv "$f" "$res/${base/-$day-/-$day-$SESSION-}"
  done
}
for phase in "$@"; do
  case $phase in
    info) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$res/gpu_info.txt"
          python3 -c "import diffsynth_attention as da, json; print(json.dumps(da.available_backends(), indent=1))" >> "$res/gpu_info.txt" ;;
    tests) timeout "${T_TESTS:-600}" python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu.py tests/integrations/test_lse.py \
             tests/tuning/test_tuner_policy.py ${TESTS_K:+-k "$TESTS_K"} -rs > "$res/gpu-tests.log" 2>&1 ;;
    bench) python3 scripts/benchmark.py --out "$res" > "$res/bench.log" 2>&1 ;;
    compiled) eval "cargs=(${COMPILED_ARGS:-})"  # shell words, quotes honoured: --layouts "b n s d"
              timeout "${T_COMPILED:-600}" python3 scripts/bench_compiled.py "${cargs[@]}" --out "$res" > "$res/compiled.log" 2>&1 ;;
    gap) timeout "${T_GAP:-300}" python3 scripts/compiled_gap.py ${GAP_ARGS:---neighbours best,eager} --out "$res" > "$res/gap.log" 2>&1 ;;
    training) timeout "${T_TRAINING:-600}" python3 scripts/bench_training.py ${TRAINING_ARGS:-} --out "$res" > "$res/training.log" 2>&1 ;;
    faults) timeout 120 python3 scripts/check_faults_gpu.py --out "$res" > "$res/faults.log" 2>&1 ;;
    first) timeout "${T_FIRST:-600}" python3 scripts/bench_first_result.py ${FIRST_ARGS:-} --out "$res" > "$res/first.log" 2>&1 ;;
    repeat) timeout "${T_REPEAT:-600}" python3 scripts/tuning_report.py repeat --n 5 ${REPEAT_ARGS:-} --out "$res" \
              --tag "${DEV:-GPU}-$day-tuning-repeat${REPEAT_TAG:-}" > "$res/repeat.log" 2>&1 ;;
    e2e) PYTHONPATH="/tmp/diff-site:$nodiff" DA_LATE_PATH=$late \
           python3 scripts/bench_e2e.py --device cuda --out "$res" ${E2E_ARGS:-} > "$res/e2e.log" 2>&1 ;;
    cp) PYTHONPATH="/tmp/diff-site:$nodiff" DA_LATE_PATH=$late timeout "${T_CP:-600}" \
          torchrun --nproc_per_node=2 scripts/bench_cp.py --out "$res" > "$res/cp.log" 2>&1 ;;
    pwarm) timeout "${T_PWARM:-600}" python3 scripts/parallel_warm.py "$res/H200x2-$day-parallel-warm.json" > "$res/pwarm.log" 2>&1 ;;
    thin) timeout "${T_THIN:-200}" python3 -m pytest -q -p no:cacheprovider -rs tests/backends/test_gpu_thin.py > "$res/gpu-thin-tests.log" 2>&1
          timeout 120 python3 scripts/bench_thin_calls.py "$res/${DEV:-GPU}-$day-thin-calls.md" --shape 1,16,2,64 --shape 1,1024,24,128 \
            > "$res/thin-bench.log" 2>&1 ;;
    hitpath) python3 scripts/bench_hit_path.py --out "$res" --tag "${DEV:-GPU}-$day-hit-path" > "$res/hitpath.log" 2>&1 ;;
    ccross) PYTHONPATH="/tmp/diff-site:$nodiff" DA_LATE_PATH=$late timeout "${T_CC:-600}" \
              python3 scripts/bench_compile_caches.py --only cross --out "$res" ${CC_ARGS:-} > "$res/ccross.log" 2>&1 ;;
    lowprec) PYTHONPATH="/tmp/diff-site:$nodiff" DA_LATE_PATH=$late timeout "${T_LOWPREC:-600}" \
               python3 scripts/bench_lowprec.py --out "$res" ${LOWPREC_ARGS:-} > "$res/lowprec.log" 2>&1 ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
  echo "phase $phase: rc $?" | tee -a "$res/phases.log"
  stamp
done
