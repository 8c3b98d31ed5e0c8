#!/usr/bin/env bash
# One call on a GPU machine: build the extension in place, run the GPU tests, benchmark the
# backends against torch.optim.AdamW(fused=True), sweep the Triton launch configuration, and print
# a short table last. Budget: under 8 minutes. From the device tool:
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
# where .whl/ holds the ivon-opt wheel (pure Python; the GPU machine has no network):
#     pip download --no-deps -d .whl ivon-opt==0.1.3
# Logs and JSON go to $OUT (the device tool's folder) or /tmp/ivon_device_check.
# `bash bench/device_check.sh quick`: build, the extension's GPU tests, one 64M benchmark (~2 min).
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ivon_device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} IVON_FAST_FORCE_CUDA=1
if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi
start=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $((SECONDS - start)) s" | tee "$OUT/summary.txt"
[ "$build_rc" -eq 0 ] || tail -40 "$OUT/build.log"

echo "== GPU tests"
start=$SECONDS
tests=tests
[ "$MODE" = quick ] && tests="tests/test_cpp.py tests/test_backend_trajectories.py"
timeout 240 python3 -m pytest -q -m gpu $tests -p no:cacheprovider --maxfail=30 \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $((SECONDS - start)) s: $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20

if [ "$MODE" = quick ]; then
    timeout 60 python3 -m bench --sizes 64M --no-ivon-opt --repeats 10 \
        --json "$OUT/bench_fp32.json" > "$OUT/bench_fp32.txt" 2>&1
    cat "$OUT/summary.txt" "$OUT/bench_fp32.txt"
    exit 0
fi

echo "== benchmark (fp32)"
timeout 150 python3 -m bench --sizes 16M,64M,256M --json "$OUT/bench_fp32.json" \
    > "$OUT/bench_fp32.txt" 2>&1
echo "== benchmark (bf16)"
timeout 60 python3 -m bench --sizes 64M --dtype bfloat16 --no-ivon-opt \
    --json "$OUT/bench_bf16.json" > "$OUT/bench_bf16.txt" 2>&1

echo "== Triton launch sweep (64M fp32, drop-in step)"
timeout 100 python3 - > "$OUT/triton_sweep.txt" 2>&1 <<'EOF'
import os
import torch
from bench.__main__ import bench_adamw, bench_ivon_fast

numel, device = 64_000_000, torch.device("cuda")
adamw = bench_adamw(numel, 4, device, torch.float32, 20)
print(f"AdamW(fused=True) {adamw * 1e3:.3f} ms")
for block in (1024, 2048, 4096, 8192):
    for warps in (4, 8, 16):
        os.environ["IVON_TRITON_BLOCK"], os.environ["IVON_TRITON_WARPS"] = str(block), str(warps)
        seconds = bench_ivon_fast(numel, 4, device, torch.float32, 20, "triton", "drop_in_step")
        print(f"BLOCK={block:5d} warps={warps:2d}  {seconds * 1e3:.3f} ms  "
              f"{32 * numel / seconds / 1e9:6.0f} GB/s  x AdamW {seconds / adamw:.3f}")
EOF

echo "== results"
cat "$OUT/summary.txt" "$OUT/triton_sweep.txt" "$OUT/bench_bf16.txt" "$OUT/bench_fp32.txt"
