#!/usr/bin/env bash
# Every GPU check of the project on one Hopper GPU, in one go (at most 9.5 minutes on an H200, each part
# under its own time limit so one slow part cannot take the others' results; run it with timeout_s 600):
#   1. tests/gpu/check.py --part layer, on an otherwise idle machine (it takes timings), with
#      megatron-core 0.16.1 (the version CI tests): FP8 vs bf16, torch._grouped_mm vs a GEMM per
#      expert, kept tokens vs padded, float32 routers under FP8, layer throughput vs megatron-core's
#      MoELayer;
#   2. tests/gpu/check.py --part train (short --bf16 and FP8 training runs over NCCL) while the CPU
#      test suite runs (CUDA hidden) against the newest megatron-core that machine's Python accepts,
#      so API drift shows up early (GPU_ONLY=1 skips the suite).
# Results: $OUT_DIR/gpu_checks.json (rewritten after every check), profiles.txt, train_*.log,
# cpu_suite_newest_mcore.log.
# The megatron-core wheels come from .whl/mcore16 and .whl/mcore19, downloaded beforehand for the GPU
# machine's Python (3.12), e.g. for 0.16.1:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl/mcore16 megatron-core==0.16.1
# Usage, from the repository root on the GPU machine: bash tests/gpu/run.sh [OUT_DIR]
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu-out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
for v in 16 19; do
  python3 -m pip install -q --no-index --no-deps --no-compile --target "/tmp/mcore$v" .whl/mcore$v/*.whl || exit 1
done
newest=$(ls /tmp/mcore19 | grep -o 'megatron_core-[0-9.]*[0-9]' | head -1)
rm -f "$OUT_DIR/gpu_checks.json"  # (check.py adds to it: start from nothing)

PYTHONPATH="/tmp/mcore16:$PWD" timeout 180 python3 tests/gpu/check.py --out "$OUT_DIR" --part layer 2>&1 \
  | tee "$OUT_DIR/gpu_checks.log"
echo "layer part: exit ${PIPESTATUS[0]} (124: cut by its time limit)" | tee -a "$OUT_DIR/gpu_checks.log"

if [ -z "${GPU_ONLY:-}" ]; then
  # -s INT: pytest stops and still prints which tests failed (-k: killed 30 s later if it does not)
  ( CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 PYTHONPATH="/tmp/mcore19:$PWD" timeout -s INT -k 30 330 \
      python3 -m pytest -q -rfE -p no:cacheprovider -n 8 tests > "$OUT_DIR/cpu_suite_newest_mcore.log" 2>&1
    echo "exit $?" >> "$OUT_DIR/cpu_suite_newest_mcore.log" ) &
fi
PYTHONPATH="/tmp/mcore16:$PWD" timeout 360 python3 tests/gpu/check.py --out "$OUT_DIR" --part train 2>&1 \
  | tee -a "$OUT_DIR/gpu_checks.log"
echo "train part: exit ${PIPESTATUS[0]} (124: cut by its time limit)" | tee -a "$OUT_DIR/gpu_checks.log"
wait
PYTHONPATH="/tmp/mcore16:$PWD" python3 tests/gpu/check.py --out "$OUT_DIR" --part summary
if [ -z "${GPU_ONLY:-}" ]; then
  echo "=== CPU suite against $newest (CUDA hidden) ==="
  grep -v -i "benchmark\|warner" "$OUT_DIR/cpu_suite_newest_mcore.log" | tail -n 30
fi
