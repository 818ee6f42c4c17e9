#!/usr/bin/env bash
# Every GPU check of the project on one Hopper GPU, in one go (4-5 minutes on an H200; run it with timeout_s >= 420):
#   - tests/gpu/check.py with megatron-core 0.16.1 (the version CI tests): FP8 vs bf16, float32
#     routers under FP8, short --bf16 and FP8 training runs, layer throughput vs megatron-core's MoELayer;
#   - meanwhile, the CPU test suite (CUDA hidden) against the newest megatron-core that machine's
#     Python accepts, so API drift shows up early.
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
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT_DIR/install.log" 2>&1 \
  || echo "editable install failed (see install.log); tests that call the megatron-switch command will fail"
newest=$(ls /tmp/mcore19 | grep -o 'megatron_core-[0-9.]*' | head -1)

[ -n "${GPU_ONLY:-}" ] || ( CUDA_VISIBLE_DEVICES="" PYTHONPATH="/tmp/mcore19:$PWD" timeout 300 \
    python3 -m pytest -q -p no:cacheprovider -n 8 tests > "$OUT_DIR/cpu_suite_newest_mcore.log" 2>&1
  echo "exit $?" >> "$OUT_DIR/cpu_suite_newest_mcore.log" ) &
suite=$!  # (GPU_ONLY=1 skips the CPU suite)

PYTHONPATH="/tmp/mcore16:$PWD" timeout 300 python3 tests/gpu/check.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_checks.log"

wait $suite
[ -n "${GPU_ONLY:-}" ] && exit 0
echo "=== CPU suite against $newest (CUDA hidden) ==="
tail -n 25 "$OUT_DIR/cpu_suite_newest_mcore.log"
