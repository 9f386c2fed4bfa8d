#!/usr/bin/env bash
# Everything this project measures on the GPU machine, in one command (see ../shared/gpu/README.md).
# Usage there, after staging the kernel wheels:  bash scripts/gpu_session.sh [tests] [bench] [e2e] [parallel] [tuning]
# Writes logs and results under $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
phases=${*:-tests bench e2e parallel}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_info.txt"
python3 -c "import diffsynth_attention as da, json; print(json.dumps(da.available_backends(), indent=1))" | tee -a "$out/gpu_info.txt"
for phase in $phases; do
  case $phase in
    tests) python3 -m pytest tests/test_gpu.py -v -rs 2>&1 | tee "$out/gpu_tests.log" | tail -60 ;;
    bench) python3 scripts/benchmark.py --out "$out" 2>&1 | tee "$out/bench.log" | tail -80 ;;
    e2e) PYTHONPATH="/tmp/diff-site:$(echo "$PYTHONPATH" | tr ':' '\n' | grep -v gpu-site | paste -sd:)" DA_LATE_PATH=/tmp/gpu-site:/tmp/gpu-site/nvidia_cutlass_dsl/dsl_packages \
           python3 scripts/bench_e2e.py --device cuda --out "$out" ${E2E_ARGS:-} 2>&1 | tee "$out/e2e.log" | tail -60 ;;
    parallel) python3 scripts/parallel_warm.py "$out/parallel_warm.json" 2>&1 | tail -30 ;;
    tuning) for kind in "cost --extra" first-call neighbours "repeat --n 5"; do
              python3 scripts/tuning_report.py $kind --out "$out" 2>&1 | tee -a "$out/tuning.log" | tail -40; done ;;
  esac
done
